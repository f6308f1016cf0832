"""Soak: 200 jobs cycling through 20 networks on a tiny model, through the same catalog and activator
the WebUI uses; prints resident memory at the start, after the 20th job and at the end (the cache limit
must keep the end within 5 % of the 20th job)."""
from __future__ import annotations

import gc
import pathlib
import random
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

import lorafiles  # noqa: E402
import models  # noqa: E402
from lib_lora.activation import Activator, Settings  # noqa: E402
from lib_lora.catalog import Catalog  # noqa: E402
from lib_lora.prompt import parse_prompt  # noqa: E402
from machine import proc_status  # noqa: E402


def rss_mb() -> float:
    return proc_status("VmRSS") / 2 ** 20


def main(jobs: int = 200, networks: int = 20, cache_limit: int = 4) -> int:
    torch.set_num_threads(1)
    model = models.sd_model("sd1", seed=0)
    with tempfile.TemporaryDirectory() as folder:
        for i in range(networks):
            lorafiles.save(pathlib.Path(folder) / f"net{i:02}.safetensors",
                           lorafiles.random_kohya_lora(model, rank=8, seed=i, scale=0.02), {})
        catalog = Catalog([folder], cache_limit=cache_limit)
        catalog.refresh()
        activator = Activator(catalog)
        rng = random.Random(0)
        settings = Settings()
        start = rss_mb()
        at20 = None
        for job in range(1, jobs + 1):
            names = rng.sample(range(networks), rng.randint(1, 3))
            prompt = "a cat " + " ".join(f"<lora:net{n:02}:{rng.choice([0.3, 0.7, 1.0])}>" for n in names)
            _text, requests, _msgs = parse_prompt(prompt)
            rep = activator.build(requests, "sd1", prompt, settings)
            activator.apply(model, rep, settings)
            assert not rep.errors, rep.errors
            gc.collect()
            if job == 20:
                at20 = rss_mb()
        activator.patcher.restore()
        gc.collect()
        end = rss_mb()
    print(f"soak: {jobs} jobs over {networks} networks, cache limit {cache_limit}")
    print(f"RSS start {start:.1f} MB, after job 20 {at20:.1f} MB, end {end:.1f} MB "
          f"({(end - at20) / at20 * 100:+.1f} % vs job 20; target within 5 %)")
    print(f"networks cached at the end: {len(catalog.cached())}")
    return 0 if end <= at20 * 1.05 else 1


if __name__ == "__main__":
    sys.exit(main())
