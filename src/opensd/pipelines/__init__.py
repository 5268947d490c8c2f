"""Generation pipelines: txt2img, img2img and inpainting."""

from opensd.pipelines.request import GenerationRequest, RequestError, validate
from opensd.pipelines.stable_diffusion import GenerationResult, StableDiffusionPipeline, StepInfo

__all__ = ["GenerationRequest", "GenerationResult", "RequestError", "StableDiffusionPipeline", "StepInfo", "validate"]
