"""Systems: built-ins, any peptide PDB, and clear errors on bad input."""
from __future__ import annotations

import numpy as np
import pytest

from molflow import InputError, builtin_systems, load_system


def test_builtins_present():
    assert {"alanine_dipeptide", "trialanine"} <= set(builtin_systems())


def test_alanine_dipeptide_protocol(ala2):
    assert ala2.n_atoms == 22
    assert (ala2.temperature_K, ala2.friction_per_ps, ala2.timestep_fs) == (300.0, 1.0, 1.0)
    assert ala2.forcefield_files == ("amber99sbildn.xml", "amber99_obc.xml")
    phi, psi = ala2.central_dihedrals()
    assert phi.tolist() == [4, 6, 8, 14] and psi.tolist() == [6, 8, 14, 16]  # DESIGN.md section 7
    names = {type(f).__name__ for f in ala2.system.getForces()}
    assert "CMMotionRemover" not in names  # it would couple copies and break replay
    assert ala2.system.getNumConstraints() == 0
    assert np.isclose(ala2.masses_amu.sum(), 144.17, atol=0.05)


def test_trialanine_not_hardwired_to_22_atoms():
    tri = load_system("trialanine")
    assert tri.n_atoms == 42
    d = tri.dihedral_indices()
    assert len(d["phi"]) == 3
    phi, _ = tri.central_dihedrals()
    assert phi.tolist() == d["phi"][1].tolist()


def test_pdb_path_and_overrides(tmp_path, ala2):
    p = tmp_path / "my_peptide.pdb"
    p.write_text(ala2.pdb_text)
    s = load_system(str(p), temperature_K=350, friction_per_ps=5)
    assert s.name == "my_peptide" and s.temperature_K == 350 and s.friction_per_ps == 5
    assert s.fingerprint != ala2.fingerprint  # settings are part of the physics


@pytest.mark.parametrize("text,match", [
    ("", "not a PDB"),
    ("ATOM      1  N   ALA A   1     xx.000   0.000   0.000  1.00  0.00           N\n", "could not parse"),
])
def test_unparsable_pdb(tmp_path, text, match):
    p = tmp_path / "bad.pdb"
    p.write_text(text)
    with pytest.raises(InputError, match=match):
        load_system(str(p))


def test_missing_file():
    with pytest.raises(InputError, match="no such system or PDB file"):
        load_system("/nonexistent/peptide.pdb")
    with pytest.raises(InputError, match="built-in systems: .*alanine_dipeptide"):
        load_system("not_a_system")


def _heavy_only(pdb_text: str) -> str:
    return "".join(l + "\n" for l in pdb_text.splitlines()
                   if l.startswith(("ATOM", "HETATM")) and l[76:78].strip() != "H") + "END\n"


def test_missing_hydrogens_gets_a_hint(tmp_path, ala2):
    p = tmp_path / "noH.pdb"
    p.write_text(_heavy_only(ala2.pdb_text))
    with pytest.raises(InputError, match="no hydrogens.*addHydrogens"):
        load_system(str(p))


def test_unknown_residue(tmp_path, ala2):
    p = tmp_path / "xyz.pdb"
    p.write_text(ala2.pdb_text.replace(" ALA ", " XYZ "))
    with pytest.raises(InputError, match="XYZ2 match no template.*XYZ is not a residue name") as err:
        load_system(str(p))
    assert "hydrogens: add them" not in str(err.value)  # it has its hydrogens: no such advice


def test_unknown_residue_without_hydrogens_is_named_before_hydrogens(tmp_path, ala2):
    """A heavy-atom PDB with an unknown residue: the residue comes first, hydrogens only after."""
    p = tmp_path / "xyz_noH.pdb"
    p.write_text(_heavy_only(ala2.pdb_text).replace(" ALA ", " XYZ "))
    with pytest.raises(InputError) as err:
        load_system(str(p))
    msg = str(err.value)
    assert "XYZ2" in msg and "XYZ is not a residue name" in msg and "addHydrogens" in msg
    assert msg.index("XYZ") < msg.index("hydrogens")
    # a known residue without hydrogens is not called unknown
    q = tmp_path / "noH.pdb"
    q.write_text(_heavy_only(ala2.pdb_text))
    with pytest.raises(InputError) as err:
        load_system(str(q))
    assert "ALA2" in str(err.value) and "not a residue name" not in str(err.value)


def test_unsupported_forcefield_file(tmp_path, ala2):
    with pytest.raises(InputError, match="unsupported force-field file"):
        load_system("alanine_dipeptide", forcefield=["amber99sbildn.prmtop"])
    with pytest.raises(InputError, match="cannot load force field"):
        load_system("alanine_dipeptide", forcefield=["no_such_forcefield.xml"])


def test_bad_settings():
    with pytest.raises(InputError, match="temperature_K must be a positive"):
        load_system("alanine_dipeptide", temperature_K=-1)
    with pytest.raises(InputError, match="unknown system setting"):
        load_system("alanine_dipeptide", pressure_bar=1)
