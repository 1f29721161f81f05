from setuptools import find_packages, setup

# The distribution is "cluster-workers" (the name "cw" on the package index
# belongs to an unrelated tool); the import name stays ``cw``.  The version
# lives here only: cw.__version__ reads it from the installed metadata.
setup(
    name="cluster-workers",
    version="0.4.0",
    description="cluster-workers: spread Python function calls over many machines",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    packages=find_packages(include=["cw", "cw.*"]),
    package_data={"cw": ["py.typed"], "cw.dashboard": ["static/*"]},
    python_requires=">=3.10",
    install_requires=["cloudpickle>=2.2", "threadpoolctl>=3.1"],
    extras_require={
        "fast": ["uvloop>=0.17; sys_platform != 'win32'"],
        "tls": ["cryptography>=3.1"],
        "test": ["aiohttp>=3.8", "prometheus_client>=0.16", "pytest>=7", "pytest-timeout>=2.1", "hypothesis>=6", "numpy",
                 "tqdm", "joblib>=1.3", "scikit-learn", "sphinx>=7", "furo", "myst-parser", "mypy", "cryptography>=3.1",
                 "uvloop>=0.17; sys_platform != 'win32'",
                 "atheris>=2.3; sys_platform == 'linux' and platform_machine == 'x86_64' and python_version < '3.13'"],
        "demo": ["numpy"],
        "dashboard": ["aiohttp>=3.8", "prometheus_client>=0.16"],
        "docs": ["sphinx>=7", "furo", "myst-parser"],
        "bench": ["loky", "distributed", "ray", "matplotlib", "numpy", "threadpoolctl",
                  "uvloop>=0.17; sys_platform != 'win32'"],
    },
    entry_points={"console_scripts": [
        "cw = cw.cli:main",
        "cw-master = cw.master.server:main",
        "cw-worker = cw.worker.__main__:main",
        "cw-status = cw.ops.status:main",
    ]},
    license="MIT",
    license_files=["LICENSE"],
    classifiers=[
        "Development Status :: 4 - Beta",
        "Intended Audience :: Science/Research",
        "License :: OSI Approved :: MIT License",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Topic :: System :: Distributed Computing",
        "Typing :: Typed",
    ],
)
