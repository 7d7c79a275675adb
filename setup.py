import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version() -> str:
    """The version lives in one place: ``__version__`` in nnunetv2_cimis/__init__.py."""
    with open(os.path.join(HERE, "nnunetv2_cimis", "__init__.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


setup(
    name="nnunetv2-cimis",
    version=read_version(),
    description="Class-incremental medical image segmentation on nnU-Net v2",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.isfile("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    python_requires=">=3.10",  # nnunetv2 and current torch need 3.10
    # The converters live in the top-level folder dataset_conversion/ (the product's layout) but install as
    # nnunetv2_cimis.dataset_conversion, so no generic top-level package name is claimed in site-packages.
    packages=find_packages(include=["nnunetv2_cimis", "nnunetv2_cimis.*"]) + ["nnunetv2_cimis.dataset_conversion"],
    package_dir={"nnunetv2_cimis.dataset_conversion": "dataset_conversion"},
    package_data={"nnunetv2_cimis": ["scenarios/presets/*.json"],
                  "nnunetv2_cimis.dataset_conversion": ["label_maps/*.json"]},
    install_requires=[
        # the tested range: the package uses nnU-Net internals (trainer hooks, the planning API, predictor
        # methods) that a minor release may change. torch is left to nnunetv2's own requirement, so a user's
        # (CUDA) torch build is never replaced.
        "nnunetv2>=2.8.1,<2.9",
        "numpy",
        "SimpleITK",
        "batchgenerators",
        "acvl-utils",
        "matplotlib",
        "tqdm",
        "Pillow",
        # NSD and HD95 of nnUNetv2_cimis_evaluate --predictions (monai.metrics); needs only numpy and torch
        "monai",
    ],
    extras_require={
        # the diffusion replay of nnUNetTrainerDDCL (2D laparoscopy): pip install "nnunetv2-cimis[ddcl]"
        "ddcl": ["diffusers>=0.27"],
        # the test suite runs the DDCL tests too
        "test": ["pytest", "pytest-xdist", "diffusers>=0.27"],
    },
    entry_points={
        "console_scripts": [
            "nnUNetv2_cimis_trainer_path = nnunetv2_cimis.trainer_folder:print_trainer_path",
            "nnUNetv2_cimis_make_scenario = nnunetv2_cimis.scenarios.make_scenario:main",
            "nnUNetv2_cimis_add_classes = nnunetv2_cimis.scenarios.add_classes:main",
            "nnUNetv2_cimis_step_memory = nnunetv2_cimis.memory.cli:main",
            "nnUNetv2_cimis_evaluate = nnunetv2_cimis.evaluation.evaluate:main",
            "nnUNetv2_cimis_predict = nnunetv2_cimis.submission.predict:main",
            "nnUNetv2_cimis_export = nnunetv2_cimis.submission.export:main",
            "nnUNetv2_cimis_step_references = nnunetv2_cimis.training.validation:main",
            "nnUNetv2_cimis_phantom = nnunetv2_cimis.phantom.cli:main",
            "nnUNetv2_cimis_demo = nnunetv2_cimis.demo:main",
            "nnUNetv2_cimis_synthesize = nnunetv2_cimis.synthesis.inversion_cli:main",
            "nnUNetv2_cimis_convert_btcv = nnunetv2_cimis.dataset_conversion.btcv:main",
            "nnUNetv2_cimis_convert_flare21 = nnunetv2_cimis.dataset_conversion.flare21:main",
            "nnUNetv2_cimis_convert_flare22 = nnunetv2_cimis.dataset_conversion.flare22:main",
            "nnUNetv2_cimis_convert_kits19 = nnunetv2_cimis.dataset_conversion.kits19:main",
            "nnUNetv2_cimis_convert_kits23 = nnunetv2_cimis.dataset_conversion.kits23:main",
            "nnUNetv2_cimis_convert_msd = nnunetv2_cimis.dataset_conversion.msd:main",
            "nnUNetv2_cimis_convert_amos = nnunetv2_cimis.dataset_conversion.amos:main",
            "nnUNetv2_cimis_convert_word = nnunetv2_cimis.dataset_conversion.word:main",
            "nnUNetv2_cimis_convert_dsad = nnunetv2_cimis.dataset_conversion.dsad:main",
        ],
    },
)
