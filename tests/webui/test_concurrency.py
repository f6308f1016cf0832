"""Listing, refreshing and reading info while a job runs never fails or changes the job's result."""
from __future__ import annotations

import threading


def test_api_calls_during_a_job(webui):
    ref, _ = webui.txt2img("a cat <lora:kohya_a:0.6>", steps=4)
    result = {}

    def job():
        result["png"], _ = webui.txt2img("a cat <lora:kohya_a:0.6>", steps=4)

    t = threading.Thread(target=job)
    t.start()
    statuses = []
    while t.is_alive():
        statuses.append(webui.call("GET", "/sdapi/v1/loras")[0])
        statuses.append(webui.call("POST", "/sdapi/v1/refresh-loras")[0])
        statuses.append(webui.call("GET", "/lora/v1/info/kohya_b")[0])
    t.join()
    assert statuses and set(statuses) == {200}
    assert result["png"] == ref


def test_jobs_in_a_row_equal_each_alone(webui):
    a_alone, _ = webui.txt2img("a cat <lora:kohya_a:0.7>")
    b_alone, _ = webui.txt2img("a cat <lora:kohya_b:0.7>")
    a_again, _ = webui.txt2img("a cat <lora:kohya_a:0.7>")
    b_again, _ = webui.txt2img("a cat <lora:kohya_b:0.7>")
    assert a_alone == a_again and b_alone == b_again
