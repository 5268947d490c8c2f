// The mask editor: paint the inpainting mask over the start image with a mouse, pen or finger.
// The mask is kept at the image's own size (white: repaint, as A1111's `mask`); the visible
// canvas shows the image with the painted part tinted. Brush size is in image pixels.
// window.MaskEditor: load(file) -> Promise, reset(), clear(), invert(), hasMask(), toDataURL().
"use strict";

window.MaskEditor = (() => {
  const view = document.getElementById("mask-canvas");
  const mask = document.createElement("canvas"); // white strokes on transparent, image-sized
  const tint = document.createElement("canvas"); // the mask in the overlay colour
  const DISPLAY_PX = 256; // the view's resolution: the image scaled up by a whole factor to about this
  const TINT = "rgba(255, 40, 160, 1)";
  let image = null;
  let last = null; // the previous point of the stroke being drawn, in image pixels

  function render() {
    const ctx = view.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.clearRect(0, 0, view.width, view.height);
    if (!image) return;
    ctx.drawImage(image, 0, 0, view.width, view.height);
    const t = tint.getContext("2d");
    t.globalCompositeOperation = "source-over";
    t.clearRect(0, 0, tint.width, tint.height);
    t.fillStyle = TINT;
    t.fillRect(0, 0, tint.width, tint.height);
    t.globalCompositeOperation = "destination-in";
    t.drawImage(mask, 0, 0);
    ctx.globalAlpha = 0.55;
    ctx.drawImage(tint, 0, 0, view.width, view.height);
    ctx.globalAlpha = 1;
  }

  function brush() {
    const size = Number(document.getElementById("brush_size").value);
    return Number.isFinite(size) && size > 0 ? size : 1;
  }

  function point(event) {
    const r = view.getBoundingClientRect(); // border included: measure from the content box
    const x = (event.clientX - r.left - view.clientLeft) / view.clientWidth;
    const y = (event.clientY - r.top - view.clientTop) / view.clientHeight;
    return { x: x * mask.width, y: y * mask.height };
  }

  function paint(from, to) {
    const ctx = mask.getContext("2d");
    const erase = document.getElementById("mask_erase").checked;
    ctx.globalCompositeOperation = erase ? "destination-out" : "source-over";
    ctx.strokeStyle = ctx.fillStyle = "#fff";
    ctx.lineWidth = brush();
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    if (from.x === to.x && from.y === to.y) {
      ctx.arc(to.x, to.y, brush() / 2, 0, 2 * Math.PI);
      ctx.fill();
    } else {
      ctx.moveTo(from.x, from.y);
      ctx.lineTo(to.x, to.y);
      ctx.stroke();
    }
    ctx.globalCompositeOperation = "source-over";
    render();
  }

  view.addEventListener("pointerdown", (event) => {
    if (!image || event.button > 0) return;
    event.preventDefault();
    view.setPointerCapture(event.pointerId);
    last = point(event);
    paint(last, last);
  });
  view.addEventListener("pointermove", (event) => {
    if (last === null) return;
    const p = point(event);
    paint(last, p);
    last = p;
  });
  for (const end of ["pointerup", "pointercancel"]) view.addEventListener(end, () => { last = null; });

  function clear() {
    mask.getContext("2d").clearRect(0, 0, mask.width, mask.height);
    render();
  }

  function filledCanvas(color) {
    // A canvas the size of the mask, filled with one colour.
    const c = document.createElement("canvas");
    c.width = mask.width;
    c.height = mask.height;
    const ctx = c.getContext("2d");
    ctx.fillStyle = color;
    ctx.fillRect(0, 0, c.width, c.height);
    return c;
  }

  function invert() {
    const inverted = filledCanvas("#fff");
    const ctx = inverted.getContext("2d");
    ctx.globalCompositeOperation = "destination-out";
    ctx.drawImage(mask, 0, 0);
    const m = mask.getContext("2d");
    m.clearRect(0, 0, mask.width, mask.height);
    m.drawImage(inverted, 0, 0);
    render();
  }

  function hasMask() {
    if (!image) return false;
    const alpha = mask.getContext("2d").getImageData(0, 0, mask.width, mask.height).data;
    for (let i = 3; i < alpha.length; i += 4) if (alpha[i] >= 128) return true;
    return false;
  }

  function toDataURL() {
    const out = filledCanvas("#000");
    out.getContext("2d").drawImage(mask, 0, 0);
    return out.toDataURL("image/png");
  }

  function reset() {
    image = null;
    document.getElementById("mask-editor").hidden = true;
  }

  function load(file) {
    return new Promise((resolve, reject) => {
      const url = URL.createObjectURL(file);
      const img = new Image();
      img.onload = () => {
        URL.revokeObjectURL(url);
        image = img;
        for (const c of [mask, tint]) { c.width = img.naturalWidth; c.height = img.naturalHeight; }
        const scale = Math.max(1, Math.floor(DISPLAY_PX / Math.max(img.naturalWidth, img.naturalHeight)));
        view.width = img.naturalWidth * scale;
        view.height = img.naturalHeight * scale;
        document.getElementById("mask-editor").hidden = false;
        clear();
        resolve();
      };
      img.onerror = () => { URL.revokeObjectURL(url); reset(); reject(new Error("the file is not an image the browser can show")); };
      img.src = url;
    });
  }

  document.getElementById("mask-clear").addEventListener("click", clear);
  document.getElementById("mask-invert").addEventListener("click", invert);
  return { load, reset, clear, invert, hasMask, toDataURL };
})();
