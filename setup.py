"""Build hook: a wheel built here ships numba's compiled kernels (README, "Cold start").

After the package is copied to the build tree, `python -m quantcli.pipelines.warmup` runs there:
it compiles every kernel into numba's cache beside the build tree's sources
(quantcli/codecs/__pycache__, quantcli/engine/__pycache__), and those files go into the wheel.
numba keys each entry on the source's sha256, the signature, the numba version and the CPU, so an
install on the machine (or CPU) that built it starts warm; anywhere else numba compiles as usual.
QUANTCLI_PREBUILD=0 skips the step (a quick wheel whose first runs compile their kernels).
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithKernels(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode or os.environ.get("QUANTCLI_PREBUILD") == "0":
            return  # an editable install compiles into the source tree's __pycache__ on first use
        package = Path(self.build_lib) / "quantcli"
        for old in package.rglob("*.nb[ic]"):  # left by an earlier build of other sources
            old.unlink()
        # NUMBA_CACHE_DIR would send the cache elsewhere; numba's other settings change the code
        env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
        env["PYTHONPATH"] = os.pathsep.join([self.build_lib, env.get("PYTHONPATH", "")])
        proc = subprocess.run([sys.executable, "-m", "quantcli.pipelines.warmup"],
                              cwd=self.build_lib, env=env)
        if proc.returncode != 0:
            self.warn("compiling the kernels failed: the wheel ships without them, and the first "
                      "runs after installing it compile them (`quantcli warmup` does it at once)")


setup(cmdclass={"build_py": BuildWithKernels})
