"""Build hook: put the default model into the wheel (all other metadata is in pyproject.toml).

``models/opensd-shapes`` sits at the repository root, outside the package, so a plain
wheel would lack it and an installed opensd would find no default model. This copies
the files a model needs (config, weights, tokenizer, model card, tiny decoder, segmenter, LCM-LoRA) into
``opensd/default_models/opensd-shapes`` of the build, where
:func:`opensd.defaults.default_model_path` looks first. Editable installs skip the copy:
they find the repository's ``models/`` folder itself.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

MODEL = Path("models") / "opensd-shapes"
MODEL_FILES = ["config.json", "model.safetensors", "README.md", "tokenizer",
               "taesd_decoder.safetensors",  # its tiny decoder (opensd train taesd)
               "segmenter.safetensors",  # its segmenter, for opensd explain (opensd train segment)
               "lcm_lora.safetensors"]  # its LCM-LoRA (opensd train lcm; --few-step)


class BuildPyWithModel(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False) or not MODEL.is_dir():
            return
        dest = Path(self.build_lib) / "opensd" / "default_models" / MODEL.name
        dest.mkdir(parents=True, exist_ok=True)
        for name in MODEL_FILES:
            src = MODEL / name
            if src.is_dir():
                shutil.copytree(src, dest / name, dirs_exist_ok=True)
            elif src.is_file():
                shutil.copy2(src, dest / name)


setup(cmdclass={"build_py": BuildPyWithModel})
