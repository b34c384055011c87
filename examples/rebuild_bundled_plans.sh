#!/usr/bin/env bash
# Rebuild every bundled plan of both demo models with the builder's current defaults, in one command (issue #14):
# shapes (w8a8, w4a8-mixed; shapes-extra: w4a8-uniform, w5a8-mixed, w3a8-mixed), scenes (all five), then the
# text-encoder plan sets, whose w8a8-te-w8 folders hold a copy of the rebuilt W8A8 denoiser plan.
#
#     OMP_NUM_THREADS=1 bash examples/rebuild_bundled_plans.sh   # ~20 min on one core, ~4 min once _work/shapes_cache holds the sweep
#
# PYTHON picks the interpreter (default: python). Every plan is calibrated on calibration prompts and every mixed
# plan picks k on validation prompts; no test prompt is seen (see each script's docstring).
set -euo pipefail
PYTHON=${PYTHON:-python}
"$PYTHON" examples/build_demo_plans.py --only w8a8 w4a8-mixed w4a8-uniform w5a8-mixed w3a8-mixed
"$PYTHON" examples/build_scenes_plans.py
"$PYTHON" examples/build_text_encoder_plans.py
