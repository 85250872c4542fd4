"""The main job, ``torch-arbiter demo``, with the loaders of its real models and its assets.

Not core library code: the library never imports this package.

- :mod:`.scenario`: the two-model scenario (``run_demo``), its live view and the files it writes;
- :mod:`.models`: local loaders of SmolLM2-135M-Instruct, all-MiniLM-L6-v2 and the digits DDPM,
  and the quality metrics (perplexity, PSNR) that tests, benchmarks and the demo share;
- ``assets/``: the digits DDPM weights made by ``scripts/train_digits_ddpm.py``.
"""
