#!/usr/bin/env python
"""Build molflow's built-in capped-peptide structures from scratch (no downloads).

Run from anywhere:

    python systems/build_systems.py            # rebuild every built-in system
    python systems/build_systems.py trialanine # rebuild one

For each system this script

1. builds the heavy atoms of ACE-<residues>-NME from internal coordinates (NeRF: Parsons et al.,
   J. Comput. Chem. 26, 1063 (2005)) with Engh-Huber bond lengths and angles, trans peptide bonds
   (omega = 180 deg) and a given (phi, psi) per residue;
2. adds hydrogens with ``openmm.app.Modeller.addHydrogens`` (amber99sbildn + amber99_obc);
3. puts the atoms of every residue in the conventional order (for ACE-ALA-NME the order of the
   usual alanine-dipeptide PDB, so that phi = atoms (4, 6, 8, 14) and psi = (6, 8, 14, 16));
4. minimises the single molecule (NoCutoff, no constraints, Reference platform: deterministic)
   and writes ``systems/<name>/structure.pdb`` with ``PDBFile.writeFile(..., keepIds=True)``,
   minus the CONECT records (OpenMM and mdtraj rebuild every bond of ACE/ALA/GLY/NME from their
   residue templates) and with the date-stamped REMARK replaced by a fixed one, so that re-running
   the script reproduces the files byte for byte;
5. re-reads the file with OpenMM and mdtraj and checks it: atom count, atom order, L chirality at
   every CA, trans peptide bonds, and that ``createSystem`` succeeds with NoCutoff.

Atom names are OpenMM's canonical ones (what ``PDBFile`` and ``mdtraj`` turn any of the usual
aliases into on reading): ACE methyl hydrogens are H1/H2/H3 (alias HH31/HH32/HH33), the NME methyl
carbon is C (alias CH3) with hydrogens H1/H2/H3.

To add a residue type, add an entry to ``SIDECHAINS`` (heavy atoms, built from internal
coordinates) and to ``ATOM_ORDER`` (final per-residue order including hydrogens).
"""

from __future__ import annotations

import argparse
import io
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openmm
from openmm import app, unit

SYSTEMS_DIR = Path(__file__).resolve().parent
FORCEFIELD_FILES = ("amber99sbildn.xml", "amber99_obc.xml")
ADD_HYDROGENS_SEED = 20240601

# --------------------------------------------------------------------------------------------
# Geometry tables (Engh & Huber 1991, Acta Cryst. A47, 392; lengths in Angstrom, angles in deg)
# --------------------------------------------------------------------------------------------
BOND = {
    "C-N": 1.329,  # peptide bond
    "N-CA": 1.458,
    "CA-C": 1.525,
    "C-O": 1.231,
    "CA-CB": 1.530,
    "CH3-C": 1.520,  # ACE methyl carbon - carbonyl carbon
    "N-CH3": 1.458,  # NME nitrogen - methyl carbon (same as N-CA)
}
ANGLE = {
    "C-N-CA": 121.7,
    "N-CA-C": 111.2,
    "CA-C-N": 116.2,
    "CA-C-O": 120.8,  # O-C-N = 360 - 116.2 - 120.8 = 123.0 (planar carbonyl)
    "C-CA-CB": 110.1,
    "N-CA-CB": 110.5,
}
OMEGA = 180.0  # trans peptide bonds

# Side-chain heavy atoms, built in order: (name, element, (a, b, c), bond, angle, torsion):
# the atom d is placed with |c-d| = bond, angle(b, c, d) = angle, dihedral(a, b, c, d) = torsion.
# Reference atoms are names within the same residue.  CB: dihedral N-C-CA-CB = +122.7 deg gives
# the L (S) configuration at CA; ``chirality_sign`` checks it after every build.
SIDECHAINS: dict[str, list[tuple[str, str, tuple[str, str, str], float, float, float]]] = {
    "GLY": [],
    "ALA": [("CB", "C", ("N", "C", "CA"), BOND["CA-CB"], ANGLE["C-CA-CB"], 122.7)],
}

# Final atom order within each residue (heavy atoms and the hydrogens addHydrogens gives them).
ATOM_ORDER = {
    "ACE": ["H1", "CH3", "H2", "H3", "C", "O"],
    "ALA": ["N", "H", "CA", "HA", "CB", "HB1", "HB2", "HB3", "C", "O"],
    "GLY": ["N", "H", "CA", "HA2", "HA3", "C", "O"],
    "NME": ["N", "H", "C", "H1", "H2", "H3"],
}

# Default backbone conformation (phi, psi) in degrees: beta / extended.  With amber99sbildn + OBC it
# minimises into the C5/beta basin (about -145, +159), the most populated basin of alanine
# dipeptide in implicit solvent, and keeps trialanine extended (no i -> i+3 hydrogen bond).  A
# C7eq-like start (-80, +75) is not a minimum in OBC: it slides into alpha_R (about -77, -15).
DEFAULT_PHI_PSI = (-120.0, 130.0)


@dataclass
class PeptideSpec:
    name: str
    sequence: list[str]  # inner residues, without the caps
    phi_psi: list[tuple[float, float]] | None = None  # per inner residue; default DEFAULT_PHI_PSI
    expected_atoms: int | None = None
    # For alanine dipeptide: required (index -> (residue name, atom name)) of the final file.
    required_order: dict[int, tuple[str, str]] = field(default_factory=dict)


ALA2_ORDER = [
    ("ACE", "H1"), ("ACE", "CH3"), ("ACE", "H2"), ("ACE", "H3"), ("ACE", "C"), ("ACE", "O"),
    ("ALA", "N"), ("ALA", "H"), ("ALA", "CA"), ("ALA", "HA"), ("ALA", "CB"),
    ("ALA", "HB1"), ("ALA", "HB2"), ("ALA", "HB3"), ("ALA", "C"), ("ALA", "O"),
    ("NME", "N"), ("NME", "H"), ("NME", "C"), ("NME", "H1"), ("NME", "H2"), ("NME", "H3"),
]

SYSTEMS = {
    "alanine_dipeptide": PeptideSpec(
        name="alanine_dipeptide",
        sequence=["ALA"],
        expected_atoms=22,
        required_order=dict(enumerate(ALA2_ORDER)),
    ),
    "trialanine": PeptideSpec(
        name="trialanine",
        sequence=["ALA", "ALA", "ALA"],
        expected_atoms=42,
    ),
}

# --------------------------------------------------------------------------------------------
# Internal-coordinate builder
# --------------------------------------------------------------------------------------------


def place_atom(a, b, c, bond: float, angle_deg: float, torsion_deg: float) -> np.ndarray:
    """NeRF: position d with |c-d| = bond, angle(b,c,d) = angle, dihedral(a,b,c,d) = torsion
    (IUPAC sign convention, the one ``dihedral`` below and mdtraj use)."""
    a, b, c = (np.asarray(p, dtype=float) for p in (a, b, c))
    theta, chi = np.radians(angle_deg), np.radians(torsion_deg)
    d2 = np.array([-bond * np.cos(theta),
                   bond * np.sin(theta) * np.cos(chi),
                   bond * np.sin(theta) * np.sin(chi)])
    bc = c - b
    bc /= np.linalg.norm(bc)
    n = np.cross(b - a, bc)
    n /= np.linalg.norm(n)
    m = np.column_stack([bc, np.cross(n, bc), n])
    return c + m @ d2


def dihedral(p0, p1, p2, p3) -> float:
    """Dihedral angle p0-p1-p2-p3 in degrees (IUPAC sign convention)."""
    b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
    b1n = b1 / np.linalg.norm(b1)
    v = b0 - np.dot(b0, b1n) * b1n
    w = b2 - np.dot(b2, b1n) * b1n
    return float(np.degrees(np.arctan2(np.dot(np.cross(b1n, v), w), np.dot(v, w))))


def chirality_sign(n, ca, c, cb) -> float:
    """Signed volume (N-CA) . ((C-CA) x (CB-CA)).

    Convention: L-amino acids (S at CA for all but Cys) have a POSITIVE signed volume.  Derivation
    (CORN rule / CIP): with HA pointing away from the viewer, N -> C -> CB runs counter-clockwise
    for S, which makes this triple product positive.  Checked empirically: positive for all 33
    residues with a CB in openmm/app/data/test.pdb (villin, a real L-protein) and for the CA of a
    published alanine-dipeptide structure.
    """
    n, ca, c, cb = (np.asarray(p, dtype=float) for p in (n, ca, c, cb))
    return float(np.dot(n - ca, np.cross(c - ca, cb - ca)))


def build_heavy_atoms(sequence: list[str], phi_psi: list[tuple[float, float]]):
    """Heavy atoms of ACE-<sequence>-NME: list of (residue name, [(atom name, element, xyz[A])])."""
    if len(phi_psi) != len(sequence):
        raise ValueError("need one (phi, psi) per residue")
    for res in sequence:
        if res not in SIDECHAINS or res not in ATOM_ORDER:
            raise ValueError(f"residue {res} has no template in build_systems.py")

    # ACE: CH3 at the origin, C on +x, the first N in the xy plane.
    ace_ch3 = np.zeros(3)
    ace_c = np.array([BOND["CH3-C"], 0.0, 0.0])
    theta = np.radians(180.0 - ANGLE["CA-C-N"])
    n_next = ace_c + BOND["C-N"] * np.array([np.cos(theta), np.sin(theta), 0.0])
    # The N-side "CA-like" atom of the first peptide bond is ACE CH3; omega = CH3-C-N-CA.
    prev = {"CA": ace_ch3, "C": ace_c}
    residues = []
    ace_o = place_atom(n_next, ace_ch3, ace_c, BOND["C-O"], ANGLE["CA-C-O"], 180.0)
    residues.append(("ACE", [("CH3", "C", ace_ch3), ("C", "C", ace_c), ("O", "O", ace_o)]))

    for res, (phi, psi) in zip(sequence, phi_psi):
        n = n_next
        ca = place_atom(prev["CA"], prev["C"], n, BOND["N-CA"], ANGLE["C-N-CA"], OMEGA)
        c = place_atom(prev["C"], n, ca, BOND["CA-C"], ANGLE["N-CA-C"], phi)
        coords = {"N": n, "CA": ca, "C": c}
        for name, _el, (ra, rb, rc), bond, ang, tor in SIDECHAINS[res]:
            coords[name] = place_atom(coords[ra], coords[rb], coords[rc], bond, ang, tor)
        n_next = place_atom(n, ca, c, BOND["C-N"], ANGLE["CA-C-N"], psi)
        coords["O"] = place_atom(n_next, ca, c, BOND["C-O"], ANGLE["CA-C-O"], 180.0)
        elements = {"N": "N", "CA": "C", "C": "C", "O": "O"}
        elements.update({name: el for name, el, *_ in SIDECHAINS[res]})
        atoms = [(name, elements[name], coords[name]) for name in ["N", "CA"]]
        atoms += [(name, el, coords[name]) for name, el, *_ in SIDECHAINS[res]]
        atoms += [(name, elements[name], coords[name]) for name in ["C", "O"]]
        residues.append((res, atoms))
        prev = {"CA": ca, "C": c}

    nme_c = place_atom(prev["CA"], prev["C"], n_next, BOND["N-CH3"], ANGLE["C-N-CA"], OMEGA)
    residues.append(("NME", [("N", "N", n_next), ("C", "C", nme_c)]))
    return residues


def heavy_topology(residues):
    """OpenMM Topology + positions (nm) of the heavy-atom model, with standard bonds."""
    top = app.Topology()
    chain = top.addChain("A")
    pos = []
    for i, (resname, atoms) in enumerate(residues):
        r = top.addResidue(resname, chain, str(i + 1))
        for name, el, xyz in atoms:
            top.addAtom(name, app.Element.getBySymbol(el), r)
            pos.append(openmm.Vec3(*(xyz / 10.0)))
    top.createStandardBonds()
    return top, unit.Quantity(pos, unit.nanometer)


def reorder_atoms(top: app.Topology, positions):
    """New Topology/positions with each residue's atoms in ATOM_ORDER order (bonds kept)."""
    pos_nm = positions.value_in_unit(unit.nanometer)
    new_top = app.Topology()
    new_pos = []
    mapping = {}
    for chain in top.chains():
        new_chain = new_top.addChain(chain.id)
        for res in chain.residues():
            new_res = new_top.addResidue(res.name, new_chain, res.id, res.insertionCode)
            by_name = {a.name: a for a in res.atoms()}
            order = ATOM_ORDER[res.name]
            if sorted(order) != sorted(by_name):
                raise RuntimeError(f"{res.name}{res.id}: atoms {sorted(by_name)} != template {sorted(order)}")
            for name in order:
                atom = by_name[name]
                mapping[atom] = new_top.addAtom(atom.name, atom.element, new_res)
                new_pos.append(pos_nm[atom.index])
    for a1, a2 in top.bonds():
        new_top.addBond(mapping[a1], mapping[a2])
    return new_top, unit.Quantity(new_pos, unit.nanometer)


# --------------------------------------------------------------------------------------------
# Energies, checks, output
# --------------------------------------------------------------------------------------------


def make_system(forcefield, topology):
    return forcefield.createSystem(topology, nonbondedMethod=app.NoCutoff, constraints=None,
                                   rigidWater=False, removeCMMotion=False)


def make_context(system):
    integrator = openmm.VerletIntegrator(0.001)
    platform = openmm.Platform.getPlatformByName("Reference")
    return openmm.Context(system, integrator, platform), integrator


def energy_and_max_force(context):
    st = context.getState(getEnergy=True, getForces=True)
    e = st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    f = st.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    return e, float(np.max(np.linalg.norm(f, axis=1)))


def backbone_report(topology, xyz_nm):
    """Per inner residue: (name, phi, psi, omega_before, chirality) computed from names."""
    res = list(topology.residues())
    idx = [{a.name: a.index for a in r.atoms()} for r in res]
    out = []
    for i in range(1, len(res) - 1):
        prev, cur, nxt = idx[i - 1], idx[i], idx[i + 1]
        prev_ca = prev.get("CA", prev.get("CH3"))
        nxt_ca = nxt.get("CA", nxt.get("C") if res[i + 1].name == "NME" else None)
        x = xyz_nm
        phi = dihedral(x[prev["C"]], x[cur["N"]], x[cur["CA"]], x[cur["C"]])
        psi = dihedral(x[cur["N"]], x[cur["CA"]], x[cur["C"]], x[nxt["N"]])
        omega_prev = dihedral(x[prev_ca], x[prev["C"]], x[cur["N"]], x[cur["CA"]])
        omega_next = dihedral(x[cur["CA"]], x[cur["C"]], x[nxt["N"]], x[nxt_ca])
        chir = (chirality_sign(x[cur["N"]], x[cur["CA"]], x[cur["C"]], x[cur["CB"]])
                if "CB" in cur else None)
        out.append((f"{res[i].name}{res[i].id}", phi, psi, omega_prev, omega_next, chir))
    return out


def check_backbone(report, where):
    for name, _phi, _psi, om1, om2, chir in report:
        for om in (om1, om2):
            assert abs(abs(om) - 180.0) < 30.0, f"{where}: {name} peptide bond not trans ({om:.1f})"
        if chir is not None:
            assert chir > 0, f"{where}: {name} CA is not L (signed volume {chir:.4g})"


def pdb_text(topology, positions) -> str:
    buf = io.StringIO()
    app.PDBFile.writeFile(topology, positions, buf, keepIds=True)
    lines = []
    for line in buf.getvalue().splitlines():
        if line.startswith("CONECT"):
            continue  # bonds of ACE/ALA/GLY/NME come from the readers' residue templates
        if line.startswith("REMARK   1 CREATED WITH OPENMM"):
            line = "REMARK   1 BUILT BY molflow systems/build_systems.py (amber99sbildn + amber99_obc, minimised)"
        lines.append(line)
    return "\n".join(lines) + "\n"


def build_system(spec: PeptideSpec, forcefield, out_dir: Path) -> None:
    phi_psi = spec.phi_psi or [DEFAULT_PHI_PSI] * len(spec.sequence)
    residues = build_heavy_atoms(spec.sequence, phi_psi)
    top, pos = heavy_topology(residues)
    check_backbone(backbone_report(top, pos.value_in_unit(unit.nanometer)), "built heavy atoms")

    # addHydrogens starts hydrogens at random offsets (Python's ``random``) and relaxes them on the
    # default platform: seed it and use Reference so that re-runs give identical files.
    random.seed(ADD_HYDROGENS_SEED)
    modeller = app.Modeller(top, pos)
    modeller.addHydrogens(forcefield, platform=openmm.Platform.getPlatformByName("Reference"))
    top, pos = reorder_atoms(modeller.topology, modeller.positions)

    system = make_system(forcefield, top)
    context, _integ = make_context(system)
    context.setPositions(pos)
    e0, f0 = energy_and_max_force(context)
    openmm.LocalEnergyMinimizer.minimize(context, 1e-3, 0)
    e1, f1 = energy_and_max_force(context)
    min_pos = context.getState(getPositions=True).getPositions(asNumpy=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "structure.pdb"
    path.write_text(pdb_text(top, min_pos))

    # ---- re-read and check what was written -------------------------------------------------
    pdb = app.PDBFile(str(path))
    n_atoms = pdb.topology.getNumAtoms()
    if spec.expected_atoms is not None:
        assert n_atoms == spec.expected_atoms, f"{spec.name}: {n_atoms} atoms, expected {spec.expected_atoms}"
    atoms = list(pdb.topology.atoms())
    for i, (rname, aname) in spec.required_order.items():
        assert (atoms[i].residue.name, atoms[i].name) == (rname, aname), \
            f"{spec.name}: atom {i} is {atoms[i].residue.name}:{atoms[i].name}, expected {rname}:{aname}"
    assert pdb.topology.getNumBonds() == top.getNumBonds(), "bond count changed on re-reading"
    system = make_system(forcefield, pdb.topology)  # must succeed with NoCutoff
    context2, _integ2 = make_context(system)
    context2.setPositions(pdb.positions)
    e_file, f_file = energy_and_max_force(context2)
    xyz = pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    report = backbone_report(pdb.topology, xyz)
    check_backbone(report, "written file")

    import mdtraj as md
    traj = md.load(str(path))
    assert traj.n_atoms == n_atoms
    assert traj.topology.n_bonds == top.getNumBonds(), "mdtraj rebuilt a different bond count"
    assert [a.name for a in traj.topology.atoms] == [a.name for a in atoms], "mdtraj names differ"
    phi_idx, phi = md.compute_phi(traj)
    psi_idx, psi = md.compute_psi(traj)
    assert len(phi_idx) == len(psi_idx) == len(spec.sequence)
    if spec.name == "alanine_dipeptide":
        assert phi_idx.tolist() == [[4, 6, 8, 14]], phi_idx
        assert psi_idx.tolist() == [[6, 8, 14, 16]], psi_idx
    for (name, p, s, *_), mp, ms in zip(report, np.degrees(phi[0]), np.degrees(psi[0])):
        assert abs(p - mp) < 1e-3 and abs(s - ms) < 1e-3, f"{name}: mdtraj phi/psi disagree"

    print(f"== {spec.name}: ACE-{'-'.join(spec.sequence)}-NME -> {path.relative_to(SYSTEMS_DIR.parent)}")
    print(f"   atoms: {n_atoms}   bonds: {pdb.topology.getNumBonds()}   forces: "
          + ", ".join(f.__class__.__name__ for f in system.getForces()))
    print(f"   built conformation (phi, psi) = {phi_psi}")
    print(f"   potential energy (NoCutoff, kJ/mol): built+H {e0:.3f} (max |F| {f0:.1f}) -> "
          f"minimised {e1:.4f} (max |F| {f1:.2e} kJ/mol/nm); re-read from PDB {e_file:.4f} "
          f"(max |F| {f_file:.2f}, 0.001 A rounding)")
    if spec.name == "alanine_dipeptide":
        print(f"   mdtraj phi atoms {phi_idx.tolist()[0]}, psi atoms {psi_idx.tolist()[0]}")
    for name, p, s, om1, om2, chir in report:
        extra = f"  chirality {chir:+.4f} nm^3 (L)" if chir is not None else "  (no CB)"
        print(f"   {name:7s} phi {p:8.2f}  psi {s:8.2f}  omega(-1) {om1:8.2f}  omega(+1) {om2:8.2f}{extra}")
    print("   createSystem(NoCutoff, constraints=None) on the written PDB: OK")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("systems", nargs="*", help=f"any of {', '.join(SYSTEMS)} (default: all)")
    args = parser.parse_args(argv)
    names = args.systems or list(SYSTEMS)
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        parser.error(f"unknown system(s) {unknown}; known: {list(SYSTEMS)}")
    forcefield = app.ForceField(*FORCEFIELD_FILES)
    print(f"OpenMM {openmm.__version__}, force field {' + '.join(FORCEFIELD_FILES)}")
    for name in names:
        build_system(SYSTEMS[name], forcefield, SYSTEMS_DIR / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
