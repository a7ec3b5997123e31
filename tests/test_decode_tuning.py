"""kernels/paged_decode/tuning.py: the per-GPU table of measured BLOCK_PAGES that launch_decode reads."""
import json

import torch

from composable_kv.kernels.paged_decode import tuning


def test_record_merges_per_gpu_and_kind(tmp_path):
    path = tmp_path / "tuned.json"
    k_art = tuning.key(64, 2, 16, True, True)
    k_dense = tuning.key(64, 2, 16, True, False)
    assert k_art != k_dense and k_art != tuning.key(64, 2, 16, False, True)
    tuning.record("GPU A", {k_art: 8}, path)
    tuning.record("GPU A", {k_dense: 4}, path)
    tuning.record("GPU B", {k_art: 2}, path)
    tuning.record("GPU A", {k_art: 16, k_art + "/order": "decode"}, path)
    assert json.loads(path.read_text()) == {"GPU A": {k_art: 16, k_art + "/order": "decode", k_dense: 4},
                                            "GPU B": {k_art: 2}}


def test_the_committed_table_is_well_formed():
    table = json.loads(tuning.TUNED.read_text())
    for gpu, entries in table.items():
        for k, v in entries.items():
            if k.endswith("/order"):  # where a dense + ART layer orders its pages: in the decode launch or before
                assert v in ("decode", "separate") and k.split("/")[4] == "art", (gpu, k, v)
                continue
            d, elt, page, split, kind = k.split("/")
            assert d.startswith("D") and elt.endswith("B") and page.startswith("page"), k
            assert split in ("split", "single") and kind in ("art", "dense"), k
            assert v in (1, 2, 4, 8, 16), (gpu, k, v)


def test_no_record_off_cuda():
    assert tuning.block_pages(torch.device("cpu"), tuning.key(64, 2, 16, True, True)) is None
