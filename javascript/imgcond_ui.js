// sd-webui-imgcond in the browser: hover hints on the panels' controls, and the gallery buttons' pick.
//
// Hints: window.imgcondHints (javascript/imgcond_hints.js, generated from the specs) maps element ids without
// their tab suffix to hints. Each becomes the `title` of `<id>_txt2img` and `<id>_img2img` (of an accordion: its
// header only, so its contents do not inherit it). Controls can appear later (slots shown on demand, the inputs of
// one RefDrop mode), and Gradio re-renders some, so the titles are checked again after every UI update.

(function() {
    const TABS = ["txt2img", "img2img"];
    let timer = null;

    function translated(text) {
        // the WebUI's localization map, when the user has one with this text
        return (typeof localization !== "undefined" && localization[text]) || text;
    }

    function target(element) {
        if (element.classList.contains("input-accordion") || element.classList.contains("gradio-accordion")) {
            return element.querySelector(".label-wrap") || element;
        }
        return element;
    }

    function applyHints() {
        const hints = window.imgcondHints;
        if (!hints) return;
        const root = gradioApp();
        for (const stem in hints) {
            const text = translated(hints[stem]);
            for (const tab of TABS) {
                const element = root.querySelector("#" + stem + "_" + tab);
                if (!element) continue;
                const where = target(element);
                if (where.title !== text) where.title = text;
            }
        }
    }

    window.imgcondApplyHints = applyHints;

    onUiLoaded(applyHints);
    onUiUpdate(function() {
        clearTimeout(timer);
        timer = setTimeout(applyHints, 250);
    });
})();

// The item of `gallery` (the value of the tab's results gallery) selected in the page, else the first, as the
// one-item gallery the server-side handler receives; [null] when there is no result yet.
function imgcondGalleryPick(tab, gallery) {
    if (!gallery || !gallery.length) return [null];
    const thumbs = Array.from(gradioApp().querySelectorAll("#" + tab + "_gallery .thumbnail-item.thumbnail-small"));
    let index = thumbs.findIndex(thumb => thumb.classList.contains("selected"));
    if (index < 0 || index >= gallery.length) index = 0;
    return [[gallery[index]]];
}
