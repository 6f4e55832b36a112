"""Two-tower candidate retrieval on TensorFlow Recommenders.

Install: ``pip install -e .`` (add ``[test]`` for the test suite).
"""
from setuptools import find_packages, setup

setup(
    name="twotower-retrieval",
    version="0.1.0",
    description=(
        "Two-tower candidate retrieval: TFRS training, SavedModel export with "
        "ScaNN, and a TF Serving-compatible model server."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["trainer*", "export*", "serving*", "updates*"]),
    package_data={"export": ["native/*.cc"]},
    install_requires=[
        # The checked stack (../shared/GUIDE.md section 1): scann[tf] 1.4.2 pins
        # tensorflow ~= 2.20.0, TFRS needs Keras 2 (tf-keras), and
        # tensorflow-serving-api 2.21 would pull tensorflow 2.21.
        "tensorflow==2.20.*",
        "tf-keras==2.20.*",
        "tensorflow-recommenders==0.7.7",
        "scann[tf]==1.4.2",
        "tensorflow-serving-api==2.20.*",
        "pandas>=2.2",
        "pyarrow>=14",
        "numpy>=1.26",
        # sparse click matrices and LAPACK Cholesky for the EASE reference (trainer.ease)
        "scipy>=1.11",
        "pydantic>=2.5,<3",
        "PyYAML>=6",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "grpcio>=1.60",
        "aiohttp>=3.9",
        # the front ends' event loop (serving.loop_thread); not built for Windows
        "uvloop>=0.19; sys_platform != 'win32'",
        "prometheus-client>=0.19",
        # trainer.tune: TPE search, median pruning, SQLite studies that resume
        "optuna>=4.0",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.2", "pytest-xdist>=3.5"],
    },
    entry_points={
        "console_scripts": [
            "twotower-train=trainer.cli:main",
            "twotower-tune=trainer.tune:main",
            "twotower-export=export.cli:main",
            "twotower-serve=serving.cli:main",
            "twotower-client=serving.client_cli:main",
            "twotower-update=updates.cli:main",
        ],
    },
)
