"""Packaging beyond pyproject.toml: the startup file ``diffusers_mixdq_startup.pth``.

Installed beside the package in site-packages, it makes Python import ``diffusers_mixdq`` at startup (cheap: no
torch, no diffusers; it only watches for the libraries' quantizer tables), so a saved MixDQ model loads with
plain ``CLIPTextModel.from_pretrained(path)`` / ``UNet2DConditionModel.from_pretrained(path)`` in a program that
never imports diffusers_mixdq; without it transformers would load such a model with random weights (a warning
only). ``DIFFUSERS_MIXDQ_NO_AUTOLOAD=1`` turns it off. Wheels get it through ``build_py``; editable installs
through their wheel's strategy (setuptools' editable_wheel), where setuptools offers that hook; the sdist through
MANIFEST.in. ``tests/test_startup_file.py`` checks all three and the load it enables.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "diffusers_mixdq_startup.pth"


class build_py_with_startup(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:
            self.copy_file(PTH, os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        return outputs if self.editable_mode else [*outputs, os.path.join(self.build_lib, PTH)]


cmdclass = {"build_py": build_py_with_startup}
try:
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # pragma: no cover - setuptools without PEP 660 support
    editable_wheel = None


if editable_wheel is not None and hasattr(editable_wheel, "_select_strategy"):

    class _WithStartup:
        """setuptools' editable strategy, writing the startup file into the editable wheel too."""

        def __init__(self, strategy):
            self._strategy = strategy

        def __call__(self, wheel, files, mapping):
            self._strategy(wheel, files, mapping)
            with open(PTH, "rb") as f:
                wheel.writestr(PTH, f.read())

        def __enter__(self):
            self._strategy.__enter__()
            return self

        def __exit__(self, *exc):
            return self._strategy.__exit__(*exc)

    class editable_wheel_with_startup(editable_wheel):
        def _select_strategy(self, *args, **kwargs):
            return _WithStartup(super()._select_strategy(*args, **kwargs))

    cmdclass["editable_wheel"] = editable_wheel_with_startup

setup(cmdclass=cmdclass)
