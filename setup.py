from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="umae",
    version="0.1.0",
    description="U-MAE (uniformity-enhanced masked autoencoders) as a plugin for timm and the MAE code",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["umae_plugin", "umae_plugin.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.1", "torchvision", "timm>=1.0", "numpy", "submitit", "tensorboard"],
    extras_require={
        "analysis": ["scikit-learn", "matplotlib"],
        "test": ["pytest", "scikit-learn", "matplotlib"],
    },
)
