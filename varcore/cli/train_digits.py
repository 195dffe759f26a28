"""varcore train-digits: the training recipe of the bundled digits models (varcore.digits.training)."""
import argparse

__all__ = ["add_parser", "run"]

DESCRIPTION = """\
Train the bundled digits models on this CPU, in ten stages: classifier (the quality harness's digit CNN),
vqvae (VAR's multi-scale VQVAE, 4x4 latent), var-drafter and var-refiner (VARs), vq (LlamaGen's single-scale
tokenizer), gpt-par and gpt-raster (the GPTs), vqvae8 (a multi-scale VQVAE with an 8x8 latent and six scales),
var8-drafter and var8-refiner (VARs on it). Each stage is seeded from --seed alone, so a run is deterministic for a seed
(same machine, torch version and number of threads), and any stage can run alone with --parts (later stages load
the tokenizers they need from the output directory).

Every stage trains on the fixed train split with random shifts of up to one pixel and writes
STAGE.safetensors (float16 weights, architecture and final metrics in the metadata) into --out (default
./digits-weights); only --into-package replaces the weights bundled in the installed package. Needs scikit-learn
for the data: pip install 'varcore[digits]'. The recipe in full: docs/digits.md.
"""


def add_parser(sub) -> argparse.ArgumentParser:
    from varcore.digits import training as digits

    p = sub.add_parser("train-digits", help="train the bundled digits models on this CPU (minutes)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    digits.add_arguments(p)
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from varcore.digits import training as digits

    return digits.run(args)
