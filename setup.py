from pathlib import Path

from setuptools import find_packages, setup

# Lower bounds are the oldest releases with every API the code calls:
INSTALL_REQUIRES = [
    # torch.serialization.safe_globals (checkpoint.py, 2.5); the differentiable all-gather
    # (distributed.py: all_gather_tensor_autograd since 2.4, renamed all_gather_single_autograd in 2.13;
    # either is used); torch.amp.GradScaler(device) (2.3); torch.load(mmap=True) (2.1). Tested with 2.14.1.
    "torch>=2.5",
    "torchvision",  # datasets, transforms v1, InterpolationMode: any release that matches torch
    # timm.layers (PatchEmbed, resample_abs_pos_embed), VisionTransformer.attn_pool / head_drop,
    # timm.optim.param_groups_weight_decay / param_groups_layer_decay. Tested with 1.0.31.
    "timm>=1.0",
    # safetensors.torch.load_file / save_file: timm / HF folders in (checkpoint.py) and out (export.py).
    # Tested with 0.8.0.
    "safetensors",
    "numpy",
    # helpers.TorchDistributedEnvironment.export(overwrite=...) and AutoExecutor(slurm_max_num_timeout=...)
    # (slurm.py). Tested with 1.5.4.
    "submitit>=1.5",
    "tensorboard",  # logger.RunLog's SummaryWriter
]

setup(
    name="umae",
    version="0.1.0",
    description="U-MAE (uniformity-enhanced masked autoencoders) as a plugin for timm and the MAE code",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # The package reads no data files of its own: .py modules only. The top-level main_*.py and
    # submitit_launcher.py stay in the checkout; installed, the same command lines are these:
    packages=find_packages(include=["umae_plugin", "umae_plugin.*"]),
    entry_points={
        "console_scripts": [
            "umae-pretrain=umae_plugin.pretrain:entry",
            "umae-linprobe=umae_plugin.linprobe:entry",
            "umae-finetune=umae_plugin.finetune:entry",
            "umae-submit=umae_plugin.slurm:entry",
            "umae-analysis=umae_plugin.analysis.__main__:entry",
            "umae-quickstart=umae_plugin.quickstart:entry",
            "umae-export=umae_plugin.export:entry",
        ],
    },
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # scikit-learn: --dataset digits, --baselines and the analyses; matplotlib: figures, quick start
        "analysis": ["scikit-learn", "matplotlib"],
        "test": ["pytest", "scikit-learn", "matplotlib"],
        # transformers: only the tests that compare with its ViTMAE (the package reads and writes HF
        # folders without it). Tested with 5.24.0.
        "hf": ["transformers"],
    },
)
