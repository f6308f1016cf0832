"""WebUI entry: an always-on script that keeps our ``lora`` network registered and reads negative-prompt tokens."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from modules import scripts  # noqa: E402

from lib_lora.webui import glue, page, tools_tab, train_tab  # noqa: E402

glue.install_callbacks()
page.install_callbacks()
train_tab.install_callbacks()
tools_tab.install_callbacks()


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
