"""The paper's figures as command-line tools: `python -m umae_plugin.analysis <tool> --help`.

| tool        | what it shows (Zhang, Wang & Wang, NeurIPS 2022)                                   |
|-------------|------------------------------------------------------------------------------------|
| `collapse`  | effective rank and singular-value spectra of features; rank over epochs (Fig. 1b-c) |
| `maskratio` | intra- / inter-class distance of masked images against the mask ratio (Fig. 2b-c)   |
| `tsne`      | t-SNE of the features of 10 classes, checkpoints side by side (Fig. 3a)            |
| `recon`     | original / masked / reconstruction / reconstruction + visible patches              |
| `sweep`     | lambda sweep summary: losses, effective rank, probe accuracy (Table 3)             |

Every tool writes PNG figures and JSON / CSV numbers into `--output_dir`. Models are rebuilt from
any checkpoint by `umae_plugin.checkpoint.load_model` (`features.load_for_analysis`).
"""

TOOLS: dict[str, str] = {
    "collapse": "effective rank and singular-value spectra of features; effective rank over epochs",
    "maskratio": "intra- / inter-class distance of masked images against the mask ratio",
    "tsne": "t-SNE of the features of a few classes, checkpoints side by side",
    "recon": "reconstruction grid of a pre-training checkpoint",
    "sweep": "table of a lambda sweep's losses, effective rank and probe accuracies",
}
