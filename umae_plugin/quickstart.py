"""Smoke run of a U-MAE model: one forward/backward step on random 32-px images."""
import torch

from .registry import create_model


def main() -> None:
    torch.manual_seed(0)
    model = create_model("umae_vit_tiny_patch16", img_size=32, patch_size=4, decoder_embed_dim=128,
                         decoder_depth=2, decoder_num_heads=4)
    loss, _, _, terms = model(torch.randn(8, 3, 32, 32), 0.75, return_terms=True)
    loss.backward()
    print(f"loss {loss.item():.4f} = loss_mae {terms['loss_mae'].item():.4f} "
          f"+ {model.lambda_unif} * loss_unif {terms['loss_unif'].item():.4f}")


if __name__ == "__main__":
    main()
