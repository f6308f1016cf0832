"""WebUI entry: an always-on script that keeps our ``lora`` network registered and reads negative-prompt tokens."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from modules import scripts  # noqa: E402

from lib_lora.webui import glue, page, tools_tab, train_tab  # noqa: E402

glue.install_callbacks({
    "before_ui": [page.register_page],
    "before_component": [page.drop_builtin_page],
    "app_started": [page.add_routes, train_tab.on_app_started, tools_tab.on_app_started],
    "ui_tabs": [train_tab.on_ui_tabs, tools_tab.on_ui_tabs],
})
# The Lora folders are scanned now, while the WebUI loads its scripts (as the built-in Lora does), not in the UI's
# callbacks, which run beside the thread that loads the model and would slow each other down.
glue.state()


class Script(scripts.Script):
    def title(self):
        return "sd-webui-lora"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process(self, p, *args):
        train_tab.refuse_while_training(p)
        glue.job_started(p)
        glue.record_networks_switch(p)

    def before_process_batch(self, p, *args, **kwargs):
        glue.strip_negative_tokens(p)

    def process_batch(self, p, *args, **kwargs):
        glue.strip_hires_negative_tokens(p)

    def process_before_every_sampling(self, p, *args, **kwargs):
        glue.restore_networks_switch(p)

    def postprocess(self, p, processed, *args):
        glue.job_finished(p)
