"""The static, torch-free catalogue of the registered model architectures.

``fundus models`` answers from this table (and ``weights/manifest.json``) without importing torch or
building a single network. The registry is checked against it: ``register_model`` refuses an entry
whose metadata differ from its catalogue row, and ``tests/test_models_contract.py`` asserts that every
registered model has a row, that the factory paths agree and that the built model's parameter count
equals ``params`` here, so the numbers cannot rot. Adding an architecture = a ``@register_model``
factory plus one row below (the contract test prints the parameter count to paste when it is wrong).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CatalogEntry:
    name: str  # registry name (``--arch``)
    factory: str  # "module:function", imported only when the model is built
    task: str  # "segmentation", ...
    arch: str  # architecture family, e.g. "imff" or "msrf"
    width: int  # base channel width
    params: int  # trainable + non-trainable parameter count of the built model
    description: str


_ENTRIES = (
    CatalogEntry("cofe", "fundus_pipeline.models.cofe:cofe", "enhancement", "cofe", 8, 3_040_945, "Cofe-Net enhancement: two-scale G + RSA (IMFF w16) + LQA, compact width 8 (shipped)"),
    CatalogEntry("cofe_add", "fundus_pipeline.models.cofe:cofe_add", "enhancement", "cofe", 8, 3_040_945, "Cofe-Net enhancement: as cofe, with the additive output rule clip(I + G)"),
    CatalogEntry("cofe_add_ctx", "fundus_pipeline.models.cofe:cofe_add_ctx", "enhancement", "cofe", 8, 3_049_265, "Cofe-Net enhancement: as cofe_add, with an image-level context (FiLM from global pooling) at G's bottleneck"),
    CatalogEntry("cofe_g", "fundus_pipeline.models.cofe:cofe_g", "enhancement", "cofe", 8, 557_379, "Cofe-Net enhancement ablation: G alone (one pass), width 8"),
    CatalogEntry("cofe_paper", "fundus_pipeline.models.cofe:cofe_paper", "enhancement", "cofe", 32, 14_335_657, "Cofe-Net enhancement at the paper's G width 32 (RSA IMFF w16)"),
    CatalogEntry("cofe_rsa", "fundus_pipeline.models.cofe:cofe_rsa", "enhancement", "cofe", 8, 2_870_453, "Cofe-Net enhancement ablation: single-scale G + RSA, width 8"),
    CatalogEntry("cofe_rsa_lqa", "fundus_pipeline.models.cofe:cofe_rsa_lqa", "enhancement", "cofe", 8, 3_040_198, "Cofe-Net enhancement ablation: single-scale G + RSA + LQA, width 8"),
    CatalogEntry("cofe_tiny", "fundus_pipeline.models.cofe:cofe_tiny", "enhancement", "cofe", 2, 85_313, "Cofe-Net enhancement, width 2 with an IMFF w2 RSA (tests only)"),
    CatalogEntry("imff", "fundus_pipeline.models.imff:imff", "segmentation", "imff", 16, 2_172_274, "IMFF-Net, compact width 16 for CPU (shipped)"),
    CatalogEntry("imff_paper", "fundus_pipeline.models.imff:imff_paper", "segmentation", "imff", 64, 34_684_354, "IMFF-Net at the paper's width (34.7 M parameters)"),
    CatalogEntry("imff_tiny", "fundus_pipeline.models.imff:imff_tiny", "segmentation", "imff", 2, 34_600, "IMFF-Net, width 2 (tests only)"),
    CatalogEntry("imff_w8", "fundus_pipeline.models.imff:imff_w8", "segmentation", "imff", 8, 544_570, "IMFF-Net, width 8"),
    CatalogEntry("msrf", "fundus_pipeline.models.msrf:msrf", "segmentation", "msrf", 16, 5_106_016, "MSRF-Net (multi-scale residual fusion, 10 DSDF blocks, gated shape stream), compact width 16 for CPU"),
    CatalogEntry("msrf_paper", "fundus_pipeline.models.msrf:msrf_paper", "segmentation", "msrf", 32, 20_406_789, "MSRF-Net at the paper width (32/64/128/256)"),
    CatalogEntry("msrf_tiny", "fundus_pipeline.models.msrf:msrf_tiny", "segmentation", "msrf", 4, 320_799, "MSRF-Net width 4, for fast tests"),
    CatalogEntry("unet_enh", "fundus_pipeline.models.cofe:unet_enh", "enhancement", "unet", 20, 3_032_343, "Plain U-Net enhancement baseline, width 20 (about the compact Cofe-Net's parameter count)"),
    CatalogEntry("unet_enh_tiny", "fundus_pipeline.models.cofe:unet_enh_tiny", "enhancement", "unet", 2, 30_573, "Plain U-Net enhancement baseline, width 2 (tests only)"),
    CatalogEntry("msrf_w8", "fundus_pipeline.models.msrf:msrf_w8", "segmentation", "msrf", 8, 1_278_688, "MSRF-Net width 8 (8/16/32/64), the variant trained on CPU and shipped"),
    CatalogEntry("sdmp", "fundus_pipeline.models.sdmp:sdmp", "quality", "sdmp", 64, 1_960_532, "SDMP-Net full-reference IQA (enhanced vs degraded): frozen IMFF w16 e1-e3 + fundus ViT d96x5 streams, deformable fusion, width 64 (shipped)"),
    CatalogEntry("sdmp_cnn", "fundus_pipeline.models.sdmp:sdmp_cnn", "quality", "sdmp", 64, 1_084_098, "SDMP-Net full-reference IQA (enhanced vs degraded) ablation: CNN stream (IMFF w16 e1-e3) only, width 64"),
    CatalogEntry("sdmp_nodeform", "fundus_pipeline.models.sdmp:sdmp_nodeform", "quality", "sdmp", 64, 1_769_746, "SDMP-Net full-reference IQA (enhanced vs degraded) ablation: without deformable fusion, width 64"),
    CatalogEntry("sdmp_tiny", "fundus_pipeline.models.sdmp:sdmp_tiny", "quality", "sdmp", 4, 35_938, "SDMP-Net full-reference IQA (enhanced vs degraded), width 4 with IMFF w2 + ViT d16x2 streams (tests only)"),
    CatalogEntry("sdmp_vit", "fundus_pipeline.models.sdmp:sdmp_vit", "quality", "sdmp", 64, 1_431_762, "SDMP-Net full-reference IQA (enhanced vs degraded) ablation: ViT stream (fundus ViT d96x5) only, width 64"),
    CatalogEntry("vit_fundus", "fundus_pipeline.models.sdmp:vit_fundus", "pretext", "vit", 96, 654_928, "Fundus ViT (patch 8, 224 input, pretext head on CLS) for SDMP-Net's ViT stream: dim 96, depth 5, heads 3"),
    CatalogEntry("vit_fundus_tiny", "fundus_pipeline.models.sdmp:vit_fundus_tiny", "pretext", "vit", 16, 22_528, "Fundus ViT (patch 8, 224 input, pretext head on CLS) for SDMP-Net's ViT stream: dim 16, depth 2, heads 2 (tests only)"),
    CatalogEntry("grade_cnn", "fundus_pipeline.models.hemf:grade_cnn", "grading", "cnn", 48, 3_068_100, "Plain CNN grader baseline (3 grades + 9 flags), widths 48/96/192/384, depths 2/3/3/2, 224 input, about the compact HEMF's FLOPs"),
    CatalogEntry("grade_cnn_tiny", "fundus_pipeline.models.hemf:grade_cnn_tiny", "grading", "cnn", 8, 26_148, "Plain CNN grader baseline (3 grades + 9 flags), widths 8/16/32/64, depths 1, 64 input (tests only)"),
    CatalogEntry("hemf", "fundus_pipeline.models.hemf:hemf", "grading", "hemf", 24, 3_277_780, "HEMF no-reference grader (3 grades + 9 flags): ELF + EGF branches, HEF fusion with MHEA, compact dims 24/48/96/192, depths 2, EGF 3 layers, 2 heads, 224 input (shipped)"),
    CatalogEntry("hemf_448", "fundus_pipeline.models.hemf:hemf_448", "grading", "hemf", 24, 3_284_692, "HEMF no-reference grader (3 grades + 9 flags): ELF + EGF branches, HEF fusion with MHEA, compact dims 24/48/96/192, depths 2, EGF 3 layers, 2 heads, 448 input with 8x8 stem patches (the 224 model's token grids)"),
    CatalogEntry("hemf_global", "fundus_pipeline.models.hemf:hemf_global", "grading", "hemf", 24, 2_010_188, "HEMF no-reference grader (3 grades + 9 flags) ablation: global (EGF) branch only, HEF fusion with MHEA, compact dims 24/48/96/192, depths 2, EGF 3 layers, 2 heads, 224 input"),
    CatalogEntry("hemf_local", "fundus_pipeline.models.hemf:hemf_local", "grading", "hemf", 24, 2_230_148, "HEMF no-reference grader (3 grades + 9 flags) ablation: local (ELF) branch only, HEF fusion with MHEA, compact dims 24/48/96/192, depths 2, EGF 3 layers, 2 heads, 224 input"),
    CatalogEntry("hemf_nomhea", "fundus_pipeline.models.hemf:hemf_nomhea", "grading", "hemf", 24, 3_231_700, "HEMF no-reference grader (3 grades + 9 flags) ablation: ELF + EGF branches, HEF fusion without MHEA, compact dims 24/48/96/192, depths 2, EGF 3 layers, 2 heads, 224 input"),
    CatalogEntry("hemf_paper", "fundus_pipeline.models.hemf:hemf_paper", "grading", "hemf", 96, 66_682_108, "HEMF no-reference grader (3 grades + 9 flags): ELF + EGF branches, HEF fusion with MHEA, the paper's dims 96/192/384/768, depths 4, EGF 3 layers, 8 heads, 224 input"),
    CatalogEntry("hemf_tiny", "fundus_pipeline.models.hemf:hemf_tiny", "grading", "hemf", 8, 271_460, "HEMF no-reference grader (3 grades + 9 flags): ELF + EGF branches, HEF fusion with MHEA, dims 8/16/32/64, depths 1, EGF 1 layer, 2 heads, 64 input (tests only)"),
)

CATALOG: dict[str, CatalogEntry] = {e.name: e for e in _ENTRIES}


def catalog_entries(pattern: str = "*", task: str | None = None) -> list[CatalogEntry]:
    """Catalogue rows sorted by name, filtered by an fnmatch ``pattern`` and ``task`` (no torch import)."""
    import fnmatch

    return [e for n, e in sorted(CATALOG.items()) if fnmatch.fnmatch(n, pattern) and (task is None or e.task == task)]
