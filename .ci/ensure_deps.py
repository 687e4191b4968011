"""Install the packages the tests and benchmarks need, only those missing (no network needed
when everything is there, as on the GPU machine)."""

import importlib.util
import subprocess
import sys

# import name -> pip requirement
NEEDED = {
    "triton": "triton>=3.6",
    "pytest": "pytest>=8",
    "xdist": "pytest-xdist",
    "ninja": "ninja",
    "numpy": "numpy",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "transformers": "transformers>=4.48",
}

missing = [req for name, req in NEEDED.items() if importlib.util.find_spec(name) is None]
if missing:
    print("installing:", " ".join(missing), flush=True)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *missing])
