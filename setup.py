"""The one compiled piece, optional: the numpy path's fused last step (src/lorafuse/compute/_kernels.c).
Where no C compiler is found the install goes on without it and lorafuse uses numpy for that step."""

import sys

from setuptools import Extension, setup

setup(ext_modules=[Extension("lorafuse.compute._kernels", ["src/lorafuse/compute/_kernels.c"], optional=True,
                             extra_compile_args=[] if sys.platform == "win32" else ["-O3"])])
