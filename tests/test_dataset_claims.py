"""One rule for taking a dataset id (nnunetv2_cimis.nnunet_folders.dataset_id_taken / claim_dataset_id), used by
the phantoms, the converters, make_scenario and add_classes; one CPU nnU-Net environment for the demo and the
tests (nnunetv2_cimis.settings.cpu_nnunet_environment)."""
import os

import pytest

from nnunetv2_cimis.errors import CIMISError
from nnunetv2_cimis.nnunet_folders import claim_dataset_id, dataset_id_taken


def test_the_rule(roots):
    assert dataset_id_taken(7) is None
    (roots / "results" / "Dataset007_Old").mkdir()
    assert dataset_id_taken(7) == str(roots / "results" / "Dataset007_Old")  # nnU-Net resolves ids in all three
    assert dataset_id_taken(7, allow="Dataset007_Old") is None
    assert dataset_id_taken(70) is None and dataset_id_taken(8) is None
    with pytest.raises(CIMISError, match=r"already used in \$nnUNet_results: Dataset007_Old; choose another -d"):
        claim_dataset_id(7, "Dataset007_New", option="-d")
    with pytest.raises(CIMISError, match="already exists: dataset id 7 is already taken; choose another id or x"):
        claim_dataset_id(7, "Dataset007_Old", overwrite_hint=" or x")
    claim_dataset_id(7, "Dataset007_Old", overwrite=True)  # its own dataset may be replaced
    # a raw folder other than $nnUNet_raw has no preprocessed / results folders of its own
    other = roots / "elsewhere"
    other.mkdir()
    assert dataset_id_taken(7, raw=str(other)) is None
    assert dataset_id_taken(7, raw=str(roots / "raw")) is not None  # $nnUNet_raw: all three folders


def test_phantoms_check_every_nnunet_folder(roots, monkeypatch, capsys):
    """The phantoms used to look at nnUNet_raw only: an id used in nnUNet_preprocessed is now refused too."""
    from nnunetv2_cimis.phantom.abdominal3d import write_abdominal_phantom
    from nnunetv2_cimis.phantom.cli import main as phantom_main
    from nnunetv2_cimis.phantom.laparoscopic2d import write_laparoscopic_phantom
    (roots / "preprocessed" / "Dataset905_Other").mkdir()
    with pytest.raises(CIMISError, match=r"already used in \$nnUNet_preprocessed: Dataset905_Other"):
        write_abdominal_phantom(str(roots / "raw"), 905, 1, shape=(16, 16, 16))
    with pytest.raises(CIMISError, match=r"already used in \$nnUNet_preprocessed"):
        write_laparoscopic_phantom(str(roots / "raw"), 905, 1, shape=(16, 16))
    with pytest.raises(SystemExit):
        phantom_main(["-d", "905", "-n", "1"])
    err = capsys.readouterr().err
    assert "already used in $nnUNet_preprocessed: Dataset905_Other; choose another id with -d" in err
    assert os.listdir(roots / "raw") == []
    # the phantom's own stale preprocessed folder does not block an overwrite
    write_abdominal_phantom(str(roots / "raw"), 906, 1, shape=(16, 16, 16))
    (roots / "preprocessed" / "Dataset906_AbdominalPhantom").mkdir()
    write_abdominal_phantom(str(roots / "raw"), 906, 1, shape=(16, 16, 16), overwrite=True)


def test_one_cpu_environment(tmp_path):
    from e2e_utils import nnunet_env
    from nnunetv2_cimis.demo import demo_environment
    from nnunetv2_cimis.settings import cpu_nnunet_environment
    demo = demo_environment(str(tmp_path / "demo"), 3, 4, lr=0.01)
    assert demo == dict(cpu_nnunet_environment(str(tmp_path / "demo" / "nnunet"), 3, 4, 2, 0.01),
                        nnUNet_cimis_final_validation="0")
    # two runs at a time share the cores
    cores = os.cpu_count() or 1
    assert demo_environment(str(tmp_path / "demo"), 3, 4, jobs=2)["OMP_NUM_THREADS"] == str(max(1, cores // 2))
    tests = nnunet_env(str(tmp_path / "t"))
    shared = ("nnUNet_n_proc_DA", "nnUNet_def_n_proc", "nnUNet_compile", "OMP_WAIT_POLICY", "nnUNet_extTrainer")
    assert {k: tests[k] for k in shared} == {k: demo[k] for k in shared}
    assert (demo["nnUNet_n_proc_DA"], demo["nnUNet_def_n_proc"], demo["OMP_WAIT_POLICY"]) == ("0", "1", "PASSIVE")
    assert tests["OMP_NUM_THREADS"] == "1" and "OMP_NUM_THREADS" not in demo and demo["nnUNet_cimis_lr"] == "0.01"
    assert all(os.path.isdir(tests[k]) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
