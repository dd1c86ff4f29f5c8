from setuptools import find_packages, setup

setup(
    name="mole_ds",
    version="0.1.0",
    description="Sparse Mixtures of LoRA Experts (LLaVA-MoLE) for multimodal LLMs on DeepSpeed",
    packages=find_packages(include=["mole_ds", "mole_ds.*"]),
    python_requires=">=3.10",
    install_requires=[
        # Loose on purpose: the Makefile installs a pinned CPU wheel first.
        "torch>=2.6",
        # ZeRO-3 per-parameter partition groups (used for expert parallelism) need >=0.19.3.
        "deepspeed>=0.19.3,<0.20",
        "transformers>=5.0,<6",
        "safetensors>=0.4",
        "datasets>=3.0",
        "webdataset>=1.0,<1.1",
        "boto3>=1.34",
        "pillow>=10",
        "numpy>=1.26",
        "pyyaml>=6",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "tensorboard>=2.15",
    ],
    extras_require={
        "dev": ["pytest>=8", "peft>=0.15", "moto[server]>=5.0",
                # the conflict study's pretrained base reads a GGUF file (mole_ds/studies/pretrained_base.py)
                "gguf==0.19.0"],
        # CUDA only; see README for the --no-build-isolation install.
        "gpu": ["megablocks>=0.10", "grouped_gemm>=0.1.6"],
        # What the lmms-eval command imports for a custom model on image tasks; lmms-eval itself is installed
        # with --no-deps (its own dependency list would replace torch with a CUDA build): see docs/eval.md.
        "eval": ["loguru", "sacrebleu", "evaluate", "pytz", "tenacity", "pytablewriter"],
    },
    # The local lmms-eval task (YAML, data, images) ships inside the package.
    package_data={"mole_ds.eval": ["tasks/*/*.yaml", "tasks/*/*.json", "tasks/*/*.py", "tasks/*/images/*"]},
    include_package_data=True,
    entry_points={"lmms_eval.models": ["mole_llava = mole_ds.eval.plugin:MANIFEST"]},
)
