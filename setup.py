from setuptools import find_packages, setup

setup(
    name="revcolv2",
    version="0.1.0",
    description="RevColV2: reversible bottom-up/top-down columns with masked image modeling, "
    "plus a detectron2 project for COCO detection and ADE20K segmentation",
    python_requires=">=3.10",
    packages=find_packages(include=["revcolv2", "revcolv2.*", "revcolv2_bench"])
    + ["revcolv2_d2", "revcolv2_d2.data"],
    package_dir={
        "revcolv2_d2": "projects/RevColV2/revcolv2_d2",
        "revcolv2_d2.data": "projects/RevColV2/revcolv2_d2/data",
    },
    install_requires=["torch", "torchvision", "timm", "fvcore", "numpy<2"],
)
