from setuptools import find_packages, setup

setup(
    name="cw",
    version="0.3.0",
    description="cluster-workers: spread Python function calls over many machines",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    packages=find_packages(include=["cw", "cw.*"]),
    python_requires=">=3.10",
    install_requires=["cloudpickle>=2.2"],
    extras_require={
        "fast": ["uvloop>=0.17; sys_platform != 'win32'"],
        "test": ["pytest>=7", "pytest-timeout>=2.1", "hypothesis>=6", "numpy", "tqdm",
                 "uvloop>=0.17; sys_platform != 'win32'",
                 "atheris>=2.3; sys_platform == 'linux' and platform_machine == 'x86_64' and python_version < '3.13'"],
        "demo": ["numpy"],
        "bench": ["loky", "distributed", "ray", "matplotlib", "numpy", "threadpoolctl",
                  "uvloop>=0.17; sys_platform != 'win32'"],
    },
    entry_points={"console_scripts": [
        "cw-master = cw.master.server:main",
        "cw-worker = cw.worker.__main__:main",
        "cw-status = cw.ops.status:main",
    ]},
    license="MIT",
)
