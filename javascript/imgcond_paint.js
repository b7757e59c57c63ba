// sd-webui-imgcond: paint a Redux / Style model mask over its image in a light canvas of our own.
//
// The brush button of a slot runs imgcondPaint(image, mask, maskId) as the `js` of its click event: it opens one
// overlay built for this slot (and removed when done: no canvas editor ever sits in the page), and resolves, when
// the user applies, to [image, PNG data URL of the mask] (white = keep, black elsewhere, the image's own size) for
// the server-side handler, which makes it the value of the slot's mask upload. Cancel resolves to [image, ""]
// (nothing changes). An existing mask is loaded into the canvas first, so a mask can be corrected.

function imgcondFileUrl(value) {
    // Gradio 4: a FileData object; Gradio 3: a data URL string
    if (!value) return null;
    if (typeof value === "string") return value;
    return value.url || (value.path ? "file=" + value.path : null);
}

function imgcondLoadImage(url) {
    return new Promise(function(resolve, reject) {
        const img = new Image();
        img.onload = () => resolve(img);
        img.onerror = () => reject(new Error("cannot load " + url));
        img.src = url;
    });
}

function imgcondPaintNotice(text) {
    const note = document.createElement("div");
    note.id = "imgcond-paint-notice";
    note.textContent = text;
    note.style.cssText = "position:fixed;top:20px;left:50%;transform:translateX(-50%);z-index:10000;padding:8px 14px;" +
        "border-radius:6px;background:var(--background-fill-primary,#fff);color:var(--body-text-color,#000);" +
        "border:1px solid var(--border-color-primary,#888);box-shadow:0 2px 8px rgba(0,0,0,.3)";
    document.body.appendChild(note);
    setTimeout(() => note.remove(), 4000);
}

const IMGCOND_PAINT_RGB = [255, 48, 96]; // the strokes' colour on screen; only their coverage makes the mask

// The mask canvas (coloured strokes, coverage in alpha) from a mask image: white becomes covered.
function imgcondMaskIntoCanvas(canvas, maskImg) {
    const ctx = canvas.getContext("2d");
    ctx.drawImage(maskImg, 0, 0, canvas.width, canvas.height);
    const data = ctx.getImageData(0, 0, canvas.width, canvas.height);
    const px = data.data;
    for (let i = 0; i < px.length; i += 4) {
        const lum = (px[i] * 299 + px[i + 1] * 587 + px[i + 2] * 114) / 1000;
        const alpha = lum * px[i + 3] / 255;
        [px[i], px[i + 1], px[i + 2]] = IMGCOND_PAINT_RGB;
        px[i + 3] = alpha >= 128 ? 255 : 0;
    }
    ctx.putImageData(data, 0, 0);
}

// The mask as the server wants it: black, white where painted (half covered or more), at the image's size.
function imgcondMaskPng(canvas) {
    const out = document.createElement("canvas");
    out.width = canvas.width;
    out.height = canvas.height;
    const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
    const px = data.data;
    for (let i = 0; i < px.length; i += 4) {
        px[i] = px[i + 1] = px[i + 2] = px[i + 3] >= 128 ? 255 : 0;
        px[i + 3] = 255;
    }
    out.getContext("2d").putImageData(data, 0, 0);
    return out.toDataURL("image/png");
}

function imgcondButton(id, label, title) {
    const b = document.createElement("button");
    b.id = id;
    b.type = "button";
    b.textContent = label;
    b.title = title;
    b.className = "lg secondary gradio-button";
    b.style.cssText = "padding:4px 12px;margin:0 4px;min-width:0";
    return b;
}

async function imgcondPaint(image, mask, maskId) {
    const url = imgcondFileUrl(image);
    if (!url) {
        imgcondPaintNotice("Upload the image first: the mask is painted over it.");
        return [image, ""];
    }
    document.getElementById("imgcond-paint")?.remove();
    let img;
    try {
        img = await imgcondLoadImage(url);
    } catch (e) {
        imgcondPaintNotice("The image could not be loaded for painting: " + e.message);
        return [image, ""];
    }
    const w = img.naturalWidth, h = img.naturalHeight;
    // on screen: large images shrink to fit, small ones grow to about 512 px (their canvas keeps the image's size)
    const scale = Math.min(Math.max(1, 512 / Math.max(w, h)), (window.innerWidth * 0.85) / w,
        (window.innerHeight * 0.7) / h);

    const overlay = document.createElement("div");
    overlay.id = "imgcond-paint";
    overlay.dataset.mask = maskId;
    overlay.style.cssText = "position:fixed;top:0;left:0;width:100vw;height:100vh;z-index:9999;display:flex;" +
        "background:rgba(0,0,0,.6);" +
        "align-items:center;justify-content:center";
    const box = document.createElement("div");
    box.style.cssText = "background:var(--background-fill-primary,#fff);color:var(--body-text-color,#000);" +
        "padding:10px;border-radius:8px;display:flex;flex-direction:column;gap:8px;max-width:95vw";
    const bar = document.createElement("div");
    bar.style.cssText = "display:flex;align-items:center;flex-wrap:wrap;gap:6px";
    const label = document.createElement("label");
    label.textContent = "Brush ";
    const brush = document.createElement("input");
    brush.id = "imgcond-paint-brush";
    brush.type = "range";
    brush.min = "2";
    brush.max = "200";
    brush.value = String(Math.max(4, Math.round(Math.min(w, h) * scale / 12)));
    brush.title = "Brush size, in screen pixels";
    label.appendChild(brush);
    const erase = imgcondButton("imgcond-paint-erase", "Erase", "Switch between painting (keep) and erasing");
    const clear = imgcondButton("imgcond-paint-clear", "Clear", "Remove the whole mask");
    const fill = imgcondButton("imgcond-paint-fill", "Fill", "Keep the whole image (then erase what to drop)");
    const cancel = imgcondButton("imgcond-paint-cancel", "Cancel", "Close without changing the mask (Esc)");
    const apply = imgcondButton("imgcond-paint-apply", "Apply", "Use this mask (Enter)");
    apply.className = "lg primary gradio-button";
    const help = document.createElement("span");
    help.textContent = "Paint what to keep.";
    bar.append(label, erase, clear, fill, help, cancel, apply);

    const stage = document.createElement("div");
    stage.style.cssText = `position:relative;width:${Math.round(w * scale)}px;height:${Math.round(h * scale)}px`;
    img.style.cssText = "position:absolute;inset:0;width:100%;height:100%;user-select:none;pointer-events:none";
    img.draggable = false;
    const canvas = document.createElement("canvas");
    canvas.id = "imgcond-paint-canvas";
    canvas.width = w;
    canvas.height = h;
    canvas.style.cssText = "position:absolute;inset:0;width:100%;height:100%;opacity:.55;cursor:crosshair;" +
        "touch-action:none";
    stage.append(img, canvas);
    box.append(bar, stage);
    overlay.appendChild(box);
    document.body.appendChild(overlay);

    const maskUrl = imgcondFileUrl(mask);
    if (maskUrl) {
        try {
            imgcondMaskIntoCanvas(canvas, await imgcondLoadImage(maskUrl));
        } catch (e) {
            imgcondPaintNotice("The current mask could not be loaded; painting starts empty.");
        }
    }

    const ctx = canvas.getContext("2d");
    const colour = "rgb(" + IMGCOND_PAINT_RGB.join(",") + ")";
    let erasing = false, last = null;
    erase.onclick = () => {
        erasing = !erasing;
        erase.textContent = erasing ? "Paint" : "Erase";
    };
    clear.onclick = () => ctx.clearRect(0, 0, w, h);
    fill.onclick = () => {
        ctx.globalCompositeOperation = "source-over";
        ctx.fillStyle = colour;
        ctx.fillRect(0, 0, w, h);
    };
    function point(event) {
        const r = canvas.getBoundingClientRect();
        return [(event.clientX - r.left) * w / r.width, (event.clientY - r.top) * h / r.height];
    }
    function stroke(to) {
        ctx.globalCompositeOperation = erasing ? "destination-out" : "source-over";
        ctx.strokeStyle = ctx.fillStyle = colour;
        ctx.lineWidth = Number(brush.value) / scale;
        ctx.lineCap = ctx.lineJoin = "round";
        ctx.beginPath();
        if (last) {
            ctx.moveTo(last[0], last[1]);
            ctx.lineTo(to[0], to[1]);
            ctx.stroke();
        } else {
            ctx.arc(to[0], to[1], ctx.lineWidth / 2, 0, 2 * Math.PI);
            ctx.fill();
        }
        last = to;
    }
    canvas.addEventListener("pointerdown", event => {
        canvas.setPointerCapture(event.pointerId);
        last = null;
        stroke(point(event));
    });
    canvas.addEventListener("pointermove", event => {
        if (last) stroke(point(event));
    });
    const lift = () => {
        last = null;
    };
    canvas.addEventListener("pointerup", lift);
    canvas.addEventListener("pointercancel", lift);

    return new Promise(resolve => {
        function done(result) {
            document.removeEventListener("keydown", keys, true);
            overlay.remove();
            resolve([image, result]);
        }
        function keys(event) {
            if (event.key === "Escape") done("");
            else if (event.key === "Enter") done(imgcondMaskPng(canvas));
            else return;
            event.preventDefault();
            event.stopPropagation();
        }
        document.addEventListener("keydown", keys, true);
        cancel.onclick = () => done("");
        apply.onclick = () => done(imgcondMaskPng(canvas));
    });
}
