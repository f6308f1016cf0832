// sd-webui-lora: a "sort by size" control for the Lora card page, and the editor's "Try weights".

onUiUpdate(function() {
    ['txt2img', 'img2img'].forEach(function(tabname) {
        var id = tabname + '_lora_extra_sort_size';
        var modified = gradioApp().getElementById(tabname + '_lora_extra_sort_date_modified');
        if (!modified || gradioApp().getElementById(id)) return;
        var size = modified.cloneNode(true); // keeps the WebUI's own onclick, which sorts by data-sortkey
        size.id = id;
        size.dataset.sortkey = 'size';
        size.title = 'Sort by size';
        size.classList.remove('extra-network-control--enabled');
        modified.after(size);
    });
});

function sdloraTryWeights(name, targetId) {
    var app = gradioApp();
    var target = app.getElementById(targetId);
    var field = function(selector) { // the txt2img tab's current value (a checked radio wins over the first)
        var elem = app.querySelector('#txt2img_' + selector + ':checked') || app.querySelector('#txt2img_' + selector);
        return elem ? elem.value : '';
    };
    var body = {
        name: name,
        prompt: field('prompt textarea'),
        negative_prompt: field('neg_prompt textarea'),
        seed: parseInt(field('seed input')) || -1,
        steps: parseInt(field('steps input[type=number]')) || 20,
        width: parseInt(field('width input[type=number]')) || 512,
        height: parseInt(field('height input[type=number]')) || 512,
        cfg_scale: parseFloat(field('cfg_scale input[type=number]')) || 7,
        sampler_name: field('sampling input'),
        scheduler: field('scheduler input'),
    };
    target.textContent = 'Rendering one image per weight…';
    fetch('./internal/lora/try-weights', {method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body)})
        .then(function(r) {
            return r.ok ? r.json() : r.text().then(function(t) {
                throw new Error(t);
            });
        })
        .then(function(data) {
            var img = document.createElement('img');
            img.className = 'sdlora-try-grid';
            img.src = 'data:image/png;base64,' + data.image;
            img.title = 'weights ' + data.weights.join(', ') + ', seed ' + data.seed;
            target.replaceChildren(img);
        })
        .catch(function(e) {
            target.textContent = 'Try weights failed: ' + e.message;
        });
}

// The WebUI's progress bar starts hidden while its options have not reached the page yet (opts.show_progressbar
// undefined): show it then, unless the user turned it off.
function sdloraShowProgress(container) {
    var div = container && container.parentNode.querySelector('.progressDiv');
    if (div && opts.show_progressbar !== false) {
        div.style.display = 'block';
    }
}

// A page opened while a run is going (or after one) shows it: the Train LoRA tab's hidden Follow button starts the
// run's progress bar and its status, log, plot and samples. Asked once per page (not when the tab is hidden), only
// then a gradio event.
onUiLoaded(function() {
    var follow = gradioApp().getElementById('sdlora_train_follow');
    if (!follow) return;
    fetch('./internal/lora/train/run')
        .then(function(r) {
            return r.ok ? r.json() : {run: false};
        })
        .then(function(data) {
            if (data.run) follow.click();
        })
        .catch(function() {});
});

// The WebUI's own progress bar (and live preview: the newest sample image) in the Train LoRA tab, following the
// run's task in the WebUI's queue, as its Generate button follows a generation.
function sdloraFollowTrainRun(taskId) {
    var app = gradioApp();
    if (taskId && !app.querySelector('#sdlora_train_job .progressDiv')) {
        requestProgress(taskId, app.getElementById('sdlora_train_progress'), app.getElementById('sdlora_train_samples'),
                        function() {});
        sdloraShowProgress(app.getElementById('sdlora_train_progress'));
    }
    return [];
}

// A LoRA Tools button: a new task id as the first input, its progress shown by the WebUI's progress bar above the
// tool's result.
function sdloraToolStart(tool, args) {
    var id = randomId();
    var result = gradioApp().getElementById('sdlora_tools_' + tool + '_result');
    requestProgress(id, result, null, function() {});
    sdloraShowProgress(result);
    args[0] = id;
    return args;
}
