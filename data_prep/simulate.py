"""A seeded, realistic cohort written in the raw MIMIC-IV ``hosp`` table layout, at any size.

``python -m data_prep.simulate --patients N --seed S --out DIR [--overwrite] [--chunk-patients K]``
writes ``DIR/hosp/{patients,admissions,diagnoses_icd,labevents,d_labitems,d_icd_diagnoses}.csv.gz``
with the MIMIC-IV demo's column names, column order, value formats (``YYYY-MM-DD HH:MM:SS``
timestamps, dates for ``dod``, empty fields for missing values, quoting only where needed) and
``DIR/simulation.json`` (seed, parameters, versions, rows per table, bytes on disk). The same code
that reads the real demo reads this output. :func:`simulate` is the Python entry point.

Generative story
----------------
Every number below is a field of :class:`SimulationParams` (the ground truth that tests read).

Patients (``patients``). Race group ~ Categorical(White 70%, Black 15%, Hispanic 8%, Asian 4%,
Other 3%), written as a real MIMIC race string of that group (:data:`RACE_STRINGS`, e.g. "WHITE",
"BLACK/AFRICAN AMERICAN", "HISPANIC/LATINO - PUERTO RICAN", "ASIAN - CHINESE", "UNKNOWN"); a string's
group is its prefix (:func:`race_group`). Gender F with probability 0.52. ``anchor_age`` from a
two-component normal mixture (young adults and older patients), clipped to 18..89 with ages of 90
and over top-coded as 91, as MIMIC-IV does. ``anchor_year`` uniform in 2110..2189 (shifted years);
``anchor_year_group`` uniform over 2008 - 2010 .. 2017 - 2019, and the patient's real calendar time
is that group's start plus Uniform(0, 3) years. Insurance (Medicare / Medicaid / Private / Other)
is constant per patient and depends on age (65 and over: mostly Medicare) and, under 65, on race
group (Black and Hispanic patients: more Medicaid). Race, insurance, language and marital status
are constant across a patient's admissions.

Outcome. The final admission ends in death with probability
``sigmoid(base + race[g] + age_per_decade * (anchor_age - 60) / 10 + male * [M] + insurance[i])``
(:meth:`SimulationParams.death_probability`): about 10% overall, highest for the Other group
(unknown race) and Black patients. A death sets ``hospital_expire_flag`` = 1, ``deathtime`` =
``dischtime``, ``discharge_location`` = "DIED" and ``dod`` = the date of death; earlier admissions
are survived. Some survivors have a ``dod`` within a year after their last discharge.

Admissions. Count per patient ~ Geometric(q = 0.30) truncated to 1..10 (mean ~1.43, as in MIMIC-IV:
~430k admissions for ~300k patients). The first admission falls within two years of 1 January of
``anchor_year``; length of stay ~ LogNormal (median 3.2 days, longer for deaths); the gap to the
next admission ~ 1 day + Exponential(300 days). Times have minute resolution, discharge follows
admission and admissions never overlap. Admission type and location, discharge location, provider,
language, marital status (age-dependent) and emergency-department times are drawn from fixed
tables shaped like the demo's.

Diagnoses (``diagnoses_icd``). A fixed code system (the same for every seed) of a few thousand
ICD-9 and ICD-10 codes: real ICD category codes and titles (e.g. 428 / I50 "Heart failure"), with
generated, hierarchy-respecting sub-codes ("4280", "I5023") whose titles qualify the category
title. Each concept has an ICD-9 and an ICD-10 code; an admission is coded in ICD-10 when its real
calendar time is on or after 1 October 2015, else in ICD-9. Per admission, 1 + Poisson(10) codes
are drawn from a Zipf-Mandelbrot law over the concepts (weight ``1 / (rank + q)^s``), plus the
patient's chronic conditions (each present in an admission with probability 0.8), de-duplicated
and numbered ``seq_num`` 1..n in random order.

Group-specific risk. Each race group has its own *risk codes* (:data:`RISK_CODES`; e.g. White:
sepsis, acute respiratory failure, cardiogenic shock; Black: acute and end-stage kidney disease;
Hispanic: cirrhosis, hepatic failure, varices; Asian: intracerebral hemorrhage, infarction, anoxic
injury; Other: GI hemorrhage, pulmonary embolism, lung cancer) in categories used by no other
code. In the admission that ends in death, each of the patient's own group's risk codes is present
with probability ``p_risk_code_death`` (0.5); the shared end-of-life codes (DNR status, palliative
care) with ``p_shared_code_death`` (0.3); otherwise every risk or shared code is present with
``p_risk_code_background`` (0.02) per admission. The same admission's labs are shifted by
group-specific amounts (:attr:`SimulationParams.lab_shifts`, in units of the item's spread): e.g.
White: WBC up, bicarbonate down, lactate up; Black: creatinine, urea nitrogen and potassium up;
Hispanic: bilirubin and INR up, albumin down; Asian: platelets down, PTT and glucose up; Other:
hemoglobin and hematocrit down, RDW up; every death also has a small shared lactate rise. So the
codes and labs that predict death differ by group, and a model fit to the majority misses
minority deaths.

Labs (``labevents``, ``d_labitems``). 67 items with real MIMIC item ids, labels, units and
reference ranges (:data:`LAB_ITEMS`), drawn in panels (chemistry, blood count, differential,
coagulation, liver, blood gas, urinalysis, smear) that share a ``specimen_id``, ``charttime`` and
``storetime``. In hospital, each panel is drawn Poisson(rate x length of stay) times (chemistry
and blood count at least once; 1.5 x the rate in an admission ending in death). Outpatient draws
(~25% of all rows, ``hadm_id`` empty): Poisson(6.95) per admission, 30% timed inside an admission
window (a preprocessor can attach them by time) and the rest before it. A numeric value is
``center + spread * z`` (or ``exp`` of it for log-normal items) with ``z = rho * u_patient,item +
sqrt(1 - rho^2) * e + shift``; ``value`` has the item's decimals, ``valuenum`` the number,
``flag`` = "abnormal" outside the reference range. Text results (urinalysis, smear, specimen type,
hold/error notes) have an empty ``valuenum``; as in MIMIC most of them sit in ``comments`` with an
empty ``value``. A few numeric rows carry the de-identified ``value`` "___" with ``valuenum`` kept.

Determinism and scale
---------------------
Patients are generated in fixed blocks of :data:`SEED_BLOCK` patients; block ``b`` draws from
``SeedSequence(seed).spawn(n_blocks)[b]``, so the decompressed content depends on ``(seed,
patients)`` only. Blocks are grouped into chunks of ``chunk_patients`` (memory is bounded by one
chunk in generation and two in writing). Each chunk of each table is serialised by polars and
compressed as an independent raw-deflate segment on a thread pool (``zlib`` releases the GIL), and
the segments are joined into one standard single-member gzip file (mtime 0), so the ``.gz`` bytes
depend on ``(seed, patients, chunk_patients)`` and never on timing. Ids: ``subject_id`` 8 digits,
increasing; ``hadm_id`` 8 digits from a bijective scramble of (patient, admission number);
``specimen_id`` a scramble of a running counter; ``labevent_id`` the row number.
"""

from __future__ import annotations

import argparse
import io
import math
import struct
import time
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import polars as pl
import pyarrow as pa

from halo_balance.errors import HaloBalanceError
from halo_balance.io import atomic_dir, check_output_dir, write_json

__all__ = [
    "SimulationParams", "simulate", "main", "race_group", "RACE_GROUPS", "RACE_STRINGS", "RISK_CODES",
    "SHARED_CODES", "LAB_ITEMS", "TABLE_COLUMNS", "SEED_BLOCK", "code_system", "lab_items_frame", "cohort_blocks",
]

SIMULATOR_VERSION = "1.0"
SEED_BLOCK = 1000  # patients per random stream; fixed so the content never depends on chunking
DEFAULT_CHUNK_PATIENTS = 5000
COMPRESSION_LEVEL = 4  # measured: ~5.7x smaller than CSV at ~65 MB/s per core (level 6: 28 MB/s)
DATETIME_FORMAT = "%Y-%m-%d %H:%M:%S"

# Column names and order of the MIMIC-IV (2.2 demo) hosp tables written here.
TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "patients": ("subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"),
    "admissions": ("subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type",
                   "admit_provider_id", "admission_location", "discharge_location", "insurance",
                   "language", "marital_status", "race", "edregtime", "edouttime",
                   "hospital_expire_flag"),
    "diagnoses_icd": ("subject_id", "hadm_id", "seq_num", "icd_code", "icd_version"),
    "labevents": ("labevent_id", "subject_id", "hadm_id", "specimen_id", "itemid", "order_provider_id",
                  "charttime", "storetime", "value", "valuenum", "valueuom", "ref_range_lower",
                  "ref_range_upper", "flag", "priority", "comments"),
    "d_labitems": ("itemid", "label", "fluid", "category"),
    "d_icd_diagnoses": ("icd_code", "icd_version", "long_title"),
}
STREAMED_TABLES = ("patients", "admissions", "diagnoses_icd", "labevents")

# ---------------------------------------------------------------------------------------------
# Groups
# ---------------------------------------------------------------------------------------------

RACE_GROUPS = ("White", "Black", "Hispanic", "Asian", "Other")
INSURANCES = ("Medicare", "Medicaid", "Private", "Other")

# Real MIMIC-IV race strings per group, with their within-group weights.
RACE_STRINGS: dict[str, tuple[tuple[str, float], ...]] = {
    "White": (("WHITE", 0.90), ("WHITE - OTHER EUROPEAN", 0.04), ("WHITE - RUSSIAN", 0.025),
              ("WHITE - EASTERN EUROPEAN", 0.015), ("WHITE - BRAZILIAN", 0.02)),
    "Black": (("BLACK/AFRICAN AMERICAN", 0.84), ("BLACK/CAPE VERDEAN", 0.08),
              ("BLACK/CARIBBEAN ISLAND", 0.05), ("BLACK/AFRICAN", 0.03)),
    "Hispanic": (("HISPANIC/LATINO - PUERTO RICAN", 0.30), ("HISPANIC OR LATINO", 0.20),
                 ("HISPANIC/LATINO - DOMINICAN", 0.17), ("HISPANIC/LATINO - GUATEMALAN", 0.07),
                 ("HISPANIC/LATINO - SALVADORAN", 0.06), ("HISPANIC/LATINO - CUBAN", 0.05),
                 ("HISPANIC/LATINO - MEXICAN", 0.04), ("HISPANIC/LATINO - COLUMBIAN", 0.04),
                 ("HISPANIC/LATINO - HONDURAN", 0.03), ("HISPANIC/LATINO - CENTRAL AMERICAN", 0.04)),
    "Asian": (("ASIAN", 0.30), ("ASIAN - CHINESE", 0.40), ("ASIAN - SOUTH EAST ASIAN", 0.12),
              ("ASIAN - ASIAN INDIAN", 0.12), ("ASIAN - KOREAN", 0.06)),
    "Other": (("OTHER", 0.35), ("UNKNOWN", 0.35), ("UNABLE TO OBTAIN", 0.10),
              ("PATIENT DECLINED TO ANSWER", 0.07), ("AMERICAN INDIAN/ALASKA NATIVE", 0.05),
              ("NATIVE HAWAIIAN OR OTHER PACIFIC ISLANDER", 0.03), ("MULTIPLE RACE/ETHNICITY", 0.05)),
}


def race_group(race: str) -> str:
    """The group (one of :data:`RACE_GROUPS`) of a MIMIC-IV race string, by its prefix."""
    for prefix, group in (("WHITE", "White"), ("BLACK", "Black"), ("HISPANIC", "Hispanic"),
                          ("SOUTH AMERICAN", "Hispanic"), ("ASIAN", "Asian")):
        if race.startswith(prefix):
            return group
    return "Other"


# ---------------------------------------------------------------------------------------------
# Ground-truth parameters
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SimulationParams:
    """Every parameter of the generative story (see the module docstring); the defaults are the truth.

    Per-group tuples follow :data:`RACE_GROUPS`; per-insurance tuples follow :data:`INSURANCES`.
    """

    race_probs: tuple[float, ...] = (0.70, 0.15, 0.08, 0.04, 0.03)
    p_female: float = 0.52
    # anchor_age: mixture of N(young_mean, young_sd) w.p. young_frac and N(old_mean, old_sd)
    age_young_frac: float = 0.25
    age_young_mean: float = 34.0
    age_young_sd: float = 10.0
    age_old_mean: float = 66.0
    age_old_sd: float = 14.0
    # insurance given age and (under 65) race group
    insurance_probs_65_plus: tuple[float, ...] = (0.84, 0.04, 0.10, 0.02)
    insurance_probs_under_65: tuple[float, ...] = (0.12, 0.24, 0.53, 0.11)
    insurance_probs_under_65_black_hispanic: tuple[float, ...] = (0.12, 0.42, 0.36, 0.10)
    # death at the end of the final admission: logistic model
    death_logit_base: float = -2.45
    death_logit_race: tuple[float, ...] = (0.0, 0.35, -0.15, 0.25, 0.60)
    death_logit_age_per_decade: float = 0.35
    death_logit_male: float = 0.12
    death_logit_insurance: tuple[float, ...] = (0.0, 0.20, -0.10, 0.10)
    p_dod_after_discharge: float = 0.12  # survivors with a recorded death within a year
    # admissions
    admissions_geometric_q: float = 0.30
    max_admissions: int = 10
    los_median_days: float = 3.2
    los_sigma: float = 0.8
    death_los_factor: float = 1.4
    gap_mean_days: float = 300.0
    icd10_from_year: float = 2015.75  # 1 October 2015
    # diagnoses
    dx_mean_codes: float = 11.0
    dx_max_codes: int = 39
    zipf_s: float = 1.1
    zipf_q: float = 5.0
    chronic_mean: float = 1.5
    chronic_persistence: float = 0.8
    p_risk_code_death: float = 0.5
    p_shared_code_death: float = 0.3
    p_risk_code_background: float = 0.02
    # labs: shifts (in spreads) of the admission that ends in death, per group: (itemid, shift)
    lab_shifts: tuple[tuple[tuple[int, float], ...], ...] = (
        ((51301, 1.2), (50882, -1.0), (50813, 0.8)),   # White: WBC, bicarbonate, lactate
        ((50912, 1.5), (51006, 1.3), (50971, 1.0)),    # Black: creatinine, urea nitrogen, potassium
        ((50885, 1.5), (51237, 1.2), (50862, -1.0)),   # Hispanic: bilirubin, INR, albumin
        ((51265, -1.3), (51275, 1.0), (50931, 1.0)),   # Asian: platelets, PTT, glucose
        ((51222, -1.3), (51221, -1.3), (51277, 1.0)),  # Other: hemoglobin, hematocrit, RDW
    )
    lab_shift_shared: tuple[tuple[int, float], ...] = ((50813, 0.4),)  # every death: lactate
    lab_patient_rho: float = 0.5  # correlation of repeated values of one item within a patient
    inpatient_panel_rates: tuple[tuple[str, float], ...] = (
        ("chem", 1.53), ("cbc", 1.33), ("diff", 0.43), ("coag", 0.67), ("lft", 0.41),
        ("bg", 0.37), ("ua", 0.15), ("smear", 0.12))  # draws per day of stay
    death_lab_rate_factor: float = 1.5
    outpatient_draws_per_admission: float = 6.95
    outpatient_panel_mix: tuple[tuple[str, float], ...] = (
        ("chem", 0.45), ("cbc", 0.35), ("lft", 0.08), ("coag", 0.06), ("ua", 0.06))
    p_outpatient_in_window: float = 0.3
    p_lab_error: float = 0.004  # numeric item reported as a hold/error note, no valuenum
    p_lab_deidentified: float = 0.01  # value "___" with valuenum kept
    vocab_seed: int = 20221  # the code system and provider pool; not the cohort seed

    def __post_init__(self) -> None:
        for name in ("race_probs", "insurance_probs_65_plus", "insurance_probs_under_65",
                     "insurance_probs_under_65_black_hispanic"):
            probs = getattr(self, name)
            if abs(sum(probs) - 1.0) > 1e-9 or min(probs) < 0:
                raise HaloBalanceError(f"SimulationParams.{name} must be probabilities summing to 1 "
                                       f"(got {probs})")

    def death_probability(self, race_index: Any, age: Any, male: Any, insurance_index: Any) -> np.ndarray:
        """P(the final admission ends in death) for arrays of race-group index, anchor_age, male (bool),
        insurance index."""
        logit = (self.death_logit_base + np.asarray(self.death_logit_race)[np.asarray(race_index)]
                 + self.death_logit_age_per_decade * (np.asarray(age, dtype=float) - 60.0) / 10.0
                 + self.death_logit_male * np.asarray(male, dtype=float)
                 + np.asarray(self.death_logit_insurance)[np.asarray(insurance_index)])
        return 1.0 / (1.0 + np.exp(-logit))

    def insurance_probabilities(self, race_index: Any, age: Any) -> np.ndarray:
        """(n, 4) matrix of P(insurance | race group, anchor_age)."""
        race_index, age = np.asarray(race_index), np.asarray(age)
        table = np.array([self.insurance_probs_65_plus, self.insurance_probs_under_65,
                          self.insurance_probs_under_65_black_hispanic])
        return table[_insurance_stratum(race_index, age)]

    @property
    def mean_admissions(self) -> float:
        """Expected admissions per patient under the truncated geometric law."""
        q, k = self.admissions_geometric_q, np.arange(1, self.max_admissions + 1)
        w = q ** (k - 1)
        return float((k * w).sum() / w.sum())


def _insurance_stratum(race_index: np.ndarray, age: np.ndarray) -> np.ndarray:
    black_hispanic = (race_index == RACE_GROUPS.index("Black")) | (race_index == RACE_GROUPS.index("Hispanic"))
    return np.where(age >= 65, 0, np.where(black_hispanic, 2, 1))


# ---------------------------------------------------------------------------------------------
# The code system: real ICD categories, generated sub-codes, group risk codes
# ---------------------------------------------------------------------------------------------

# (ICD-9 category, ICD-10 category, title), roughly from most to least frequent.
ICD_CATEGORIES: tuple[tuple[str, str, str], ...] = (
    ("401", "I10", "Essential (primary) hypertension"),
    ("272", "E78", "Disorders of lipoprotein metabolism and other lipidemias"),
    ("530", "K21", "Gastro-esophageal reflux disease"),
    ("250", "E11", "Type 2 diabetes mellitus"),
    ("414", "I25", "Chronic ischemic heart disease"),
    ("427", "I48", "Atrial fibrillation and flutter"),
    ("311", "F32", "Depressive episode"),
    ("244", "E03", "Other hypothyroidism"),
    ("300", "F41", "Other anxiety disorders"),
    ("305", "F17", "Nicotine dependence"),
    ("285", "D64", "Other anemias"),
    ("276", "E87", "Other disorders of fluid, electrolyte and acid-base balance"),
    ("428", "I50", "Heart failure"),
    ("599", "N39", "Other disorders of urinary system"),
    ("327", "G47", "Sleep disorders"),
    ("278", "E66", "Overweight and obesity"),
    ("V58", "Z79", "Long term (current) drug therapy"),
    ("V15", "Z87", "Personal history of other diseases and conditions"),
    ("V45", "Z95", "Presence of cardiac and vascular implants and grafts"),
    ("V12", "Z86", "Personal history of certain other diseases"),
    ("V10", "Z85", "Personal history of malignant neoplasm"),
    ("V43", "Z96", "Presence of other functional implants"),
    ("V44", "Z93", "Artificial opening status"),
    ("V46", "Z99", "Dependence on enabling machines and devices, not elsewhere classified"),
    ("V17", "Z82", "Family history of certain disabilities and chronic diseases"),
    ("V16", "Z80", "Family history of primary malignant neoplasm"),
    ("V88", "Z90", "Acquired absence of organs, not elsewhere classified"),
    ("V62", "Z63", "Other problems related to primary support group, including family circumstances"),
    ("V60", "Z59", "Problems related to housing and economic circumstances"),
    ("V64", "Z53", "Persons encountering health services for specific procedures and treatment, "
                   "not carried out"),
    ("V14", "Z88", "Allergy status to drugs, medicaments and biological substances"),
    ("V50", "Z41", "Encounter for procedures for purposes other than remedying health state"),
    ("V54", "Z47", "Orthopedic aftercare"),
    ("V57", "Z50", "Encounter for care involving the use of rehabilitation procedures"),
    ("V70", "Z00", "Encounter for general examination without complaint, suspected or reported diagnosis"),
    ("V42", "Z94", "Transplanted organ and tissue status"),
    ("V09", "Z16", "Resistance to antimicrobial drugs"),
    ("V08", "Z21", "Asymptomatic human immunodeficiency virus [HIV] infection status"),
    ("V85", "Z68", "Body mass index [BMI]"),
    ("E849", "Y92", "Place of occurrence of the external cause"),
    ("E878", "Y83", "Surgical operation and other surgical procedures as the cause of abnormal "
                    "reaction of the patient"),
    ("E934", "T45", "Poisoning by, adverse effect of and underdosing of primarily systemic and "
                    "hematological agents"),
    ("E947", "Y63", "Failure in dosage during surgical and medical care"),
    ("E885", "W19", "Unspecified fall"),
    ("E888", "W18", "Other slipping, tripping and stumbling and falls"),
    ("E850", "T40", "Poisoning by, adverse effect of and underdosing of narcotics and psychodysleptics"),
    ("E942", "T46", "Poisoning by, adverse effect of and underdosing of agents primarily affecting "
                    "the cardiovascular system"),
    ("E932", "T38", "Poisoning by, adverse effect of and underdosing of hormones and their synthetic "
                    "substitutes and antagonists"),
    ("E935", "T39", "Poisoning by, adverse effect of and underdosing of nonopioid analgesics, "
                    "antipyretics and antirheumatics"),
    ("E930", "T36", "Poisoning by, adverse effect of and underdosing of systemic antibiotics"),
    ("496", "J44", "Other chronic obstructive pulmonary disease"),
    ("493", "J45", "Asthma"),
    ("486", "J18", "Pneumonia, unspecified organism"),
    ("491", "J41", "Simple and mucopurulent chronic bronchitis"),
    ("511", "J90", "Pleural effusion, not elsewhere classified"),
    ("786", "R06", "Abnormalities of breathing"),
    ("780", "R53", "Malaise and fatigue"),
    ("787", "R11", "Nausea and vomiting"),
    ("789", "R10", "Abdominal and pelvic pain"),
    ("788", "R33", "Retention of urine"),
    ("799", "R41", "Other symptoms and signs involving cognitive functions and awareness"),
    ("790", "R79", "Other abnormal findings of blood chemistry"),
    ("784", "R51", "Headache"),
    ("782", "R60", "Edema, not elsewhere classified"),
    ("781", "R26", "Abnormalities of gait and mobility"),
    ("783", "R63", "Symptoms and signs concerning food and fluid intake"),
    ("791", "R80", "Proteinuria"),
    ("793", "R91", "Abnormal findings on diagnostic imaging of lung"),
    ("794", "R94", "Abnormal results of function studies"),
    ("796", "R03", "Abnormal blood-pressure reading, without diagnosis"),
    ("682", "L03", "Cellulitis and acute lymphangitis"),
    ("707", "L89", "Pressure ulcer"),
    ("692", "L30", "Other and unspecified dermatitis"),
    ("696", "L40", "Psoriasis"),
    ("709", "L98", "Other disorders of skin and subcutaneous tissue, not elsewhere classified"),
    ("715", "M19", "Other and unspecified osteoarthritis"),
    ("724", "M54", "Dorsalgia"),
    ("733", "M81", "Osteoporosis without current pathological fracture"),
    ("714", "M06", "Other rheumatoid arthritis"),
    ("274", "M10", "Gout"),
    ("729", "M79", "Other and unspecified soft tissue disorders, not elsewhere classified"),
    ("719", "M25", "Other joint disorder, not elsewhere classified"),
    ("820", "S72", "Fracture of femur"),
    ("805", "S32", "Fracture of lumbar spine and pelvis"),
    ("807", "S22", "Fracture of rib(s), sternum and thoracic spine"),
    ("813", "S52", "Fracture of forearm"),
    ("850", "S06", "Intracranial injury"),
    ("873", "S01", "Open wound of head"),
    ("996", "T82", "Complications of cardiac and vascular prosthetic devices, implants and grafts"),
    ("997", "T81", "Complications of procedures, not elsewhere classified"),
    ("998", "K91", "Intraoperative and postprocedural complications and disorders of digestive system"),
    ("995", "T78", "Adverse effects, not elsewhere classified"),
    ("410", "I21", "Acute myocardial infarction"),
    ("411", "I20", "Angina pectoris"),
    ("424", "I35", "Nonrheumatic aortic valve disorders"),
    ("425", "I42", "Cardiomyopathy"),
    ("426", "I44", "Atrioventricular and left bundle-branch block"),
    ("453", "I82", "Other venous embolism and thrombosis"),
    ("440", "I70", "Atherosclerosis"),
    ("443", "I73", "Other peripheral vascular diseases"),
    ("458", "I95", "Hypotension"),
    ("416", "I27", "Other pulmonary heart diseases"),
    ("397", "I07", "Rheumatic tricuspid valve diseases"),
    ("398", "I09", "Other rheumatic heart diseases"),
    ("433", "I65", "Occlusion and stenosis of precerebral arteries, not resulting in cerebral infarction"),
    ("435", "G45", "Transient cerebral ischemic attacks and related syndromes"),
    ("438", "I69", "Sequelae of cerebrovascular disease"),
    ("345", "G40", "Epilepsy and recurrent seizures"),
    ("332", "G20", "Parkinson's disease"),
    ("331", "G30", "Alzheimer's disease"),
    ("290", "F03", "Unspecified dementia"),
    ("294", "F06", "Other mental disorders due to known physiological condition"),
    ("296", "F31", "Bipolar disorder"),
    ("295", "F20", "Schizophrenia"),
    ("303", "F10", "Alcohol related disorders"),
    ("304", "F11", "Opioid related disorders"),
    ("292", "F19", "Other psychoactive substance related disorders"),
    ("309", "F43", "Reaction to severe stress, and adjustment disorders"),
    ("357", "G62", "Other and unspecified polyneuropathies"),
    ("338", "G89", "Pain, not elsewhere classified"),
    ("346", "G43", "Migraine"),
    ("340", "G35", "Multiple sclerosis"),
    ("365", "H40", "Glaucoma"),
    ("366", "H25", "Age-related cataract"),
    ("389", "H91", "Other and unspecified hearing loss"),
    ("553", "K43", "Ventral hernia"),
    ("560", "K56", "Paralytic ileus and intestinal obstruction without hernia"),
    ("562", "K57", "Diverticular disease of intestine"),
    ("564", "K59", "Other functional intestinal disorders"),
    ("574", "K80", "Cholelithiasis"),
    ("577", "K85", "Acute pancreatitis"),
    ("535", "K29", "Gastritis and duodenitis"),
    ("531", "K25", "Gastric ulcer"),
    ("555", "K50", "Crohn's disease [regional enteritis]"),
    ("556", "K51", "Ulcerative colitis"),
    ("008", "A04", "Other bacterial intestinal infections"),
    ("041", "B96", "Other bacterial agents as the cause of diseases classified elsewhere"),
    ("070", "B18", "Chronic viral hepatitis"),
    ("042", "B20", "Human immunodeficiency virus [HIV] disease"),
    ("112", "B37", "Candidiasis"),
    ("110", "B35", "Dermatophytosis"),
    ("590", "N10", "Acute pyelonephritis"),
    ("592", "N20", "Calculus of kidney and ureter"),
    ("600", "N40", "Benign prostatic hyperplasia"),
    ("593", "N28", "Other disorders of kidney and ureter, not elsewhere classified"),
    ("596", "N32", "Other disorders of bladder"),
    ("626", "N92", "Excessive, frequent and irregular menstruation"),
    ("218", "D25", "Leiomyoma of uterus"),
    ("174", "C50", "Malignant neoplasm of breast"),
    ("185", "C61", "Malignant neoplasm of prostate"),
    ("153", "C18", "Malignant neoplasm of colon"),
    ("157", "C25", "Malignant neoplasm of pancreas"),
    ("155", "C22", "Malignant neoplasm of liver and intrahepatic bile ducts"),
    ("188", "C67", "Malignant neoplasm of bladder"),
    ("189", "C64", "Malignant neoplasm of kidney, except renal pelvis"),
    ("202", "C83", "Non-follicular lymphoma"),
    ("204", "C91", "Lymphoid leukemia"),
    ("205", "C92", "Myeloid leukemia"),
    ("203", "C90", "Multiple myeloma and malignant plasma cell neoplasms"),
    ("197", "C78", "Secondary malignant neoplasm of respiratory and digestive organs"),
    ("198", "C79", "Secondary malignant neoplasm of other and unspecified sites"),
    ("211", "D12", "Benign neoplasm of colon, rectum, anus and anal canal"),
    ("238", "D47", "Other neoplasms of uncertain behavior of lymphoid, hematopoietic and related tissue"),
    ("280", "D50", "Iron deficiency anemia"),
    ("281", "D51", "Vitamin B12 deficiency anemia"),
    ("282", "D57", "Sickle-cell disorders"),
    ("286", "D68", "Other coagulation defects"),
    ("287", "D69", "Purpura and other hemorrhagic conditions"),
    ("288", "D72", "Other disorders of white blood cells"),
    ("289", "D73", "Diseases of spleen"),
    ("240", "E04", "Other nontoxic goiter"),
    ("242", "E05", "Thyrotoxicosis [hyperthyroidism]"),
    ("251", "E16", "Other disorders of pancreatic internal secretion"),
    ("253", "E23", "Hypofunction and other disorders of the pituitary gland"),
    ("255", "E27", "Other disorders of adrenal gland"),
    ("268", "E55", "Vitamin D deficiency"),
    ("263", "E44", "Protein-calorie malnutrition of moderate and mild degree"),
    ("275", "E83", "Disorders of mineral metabolism"),
    ("277", "E88", "Other and unspecified metabolic disorders"),
    ("249", "E09", "Drug or chemical induced diabetes mellitus"),
    ("648", "O99", "Other maternal diseases classifiable elsewhere but complicating pregnancy, "
                   "childbirth and the puerperium"),
    ("V27", "Z37", "Outcome of delivery"),
    ("V30", "Z38", "Liveborn infants according to place of birth and type of delivery"),
)


class RiskCode(NamedTuple):
    icd9: str
    icd10: str
    title9: str
    title10: str


# Codes whose presence in the admission that ends in death depends on the patient's group.
RISK_CODES: dict[str, tuple[RiskCode, ...]] = {
    "White": (RiskCode("0389", "A419", "Unspecified septicemia", "Sepsis, unspecified organism"),
              RiskCode("51881", "J9600", "Acute respiratory failure",
                       "Acute respiratory failure, unspecified whether with hypoxia or hypercapnia"),
              RiskCode("78551", "R570", "Cardiogenic shock", "Cardiogenic shock")),
    "Black": (RiskCode("5849", "N179", "Acute kidney failure, unspecified", "Acute kidney failure, unspecified"),
              RiskCode("5856", "N186", "End stage renal disease", "End stage renal disease"),
              RiskCode("40391", "I120", "Hypertensive chronic kidney disease, unspecified, with chronic "
                       "kidney disease stage V or end stage renal disease", "Hypertensive chronic kidney "
                       "disease with stage 5 chronic kidney disease or end stage renal disease")),
    "Hispanic": (RiskCode("5715", "K7460", "Cirrhosis of liver without mention of alcohol",
                          "Unspecified cirrhosis of liver"),
                 RiskCode("5722", "K7290", "Hepatic encephalopathy", "Hepatic failure, unspecified without coma"),
                 RiskCode("4560", "I8511", "Esophageal varices with bleeding",
                          "Secondary esophageal varices with bleeding")),
    "Asian": (RiskCode("431", "I619", "Intracerebral hemorrhage",
                       "Nontraumatic intracerebral hemorrhage, unspecified"),
              RiskCode("43491", "I639", "Cerebral artery occlusion, unspecified with cerebral infarction",
                       "Cerebral infarction, unspecified"),
              RiskCode("3481", "G931", "Anoxic brain damage", "Anoxic brain damage, not elsewhere classified")),
    "Other": (RiskCode("5789", "K922", "Hemorrhage of gastrointestinal tract, unspecified",
                       "Gastrointestinal hemorrhage, unspecified"),
              RiskCode("41519", "I2699", "Other pulmonary embolism and infarction",
                       "Other pulmonary embolism without acute cor pulmonale"),
              RiskCode("1629", "C3490", "Malignant neoplasm of bronchus and lung, unspecified",
                       "Malignant neoplasm of unspecified part of unspecified bronchus or lung")),
}
# End-of-life codes more frequent in every group's deaths.
SHARED_CODES: tuple[RiskCode, ...] = (
    RiskCode("V4986", "Z66", "Do not resuscitate status", "Do not resuscitate"),
    RiskCode("V667", "Z515", "Encounter for palliative care", "Encounter for palliative care"),
)
# ICD-10 category titles of the risk and shared codes (d_icd_diagnoses lists categories too).
_RISK_CATEGORY_TITLES = {
    "A41": "Other sepsis", "J96": "Respiratory failure, not elsewhere classified",
    "R57": "Shock, not elsewhere classified", "N17": "Acute kidney failure",
    "N18": "Chronic kidney disease (CKD)", "I12": "Hypertensive chronic kidney disease",
    "K74": "Fibrosis and cirrhosis of liver", "K72": "Hepatic failure, not elsewhere classified",
    "I85": "Esophageal varices", "I61": "Nontraumatic intracerebral hemorrhage",
    "I63": "Cerebral infarction", "G93": "Other disorders of brain",
    "K92": "Other diseases of digestive system", "I26": "Pulmonary embolism",
    "C34": "Malignant neoplasm of bronchus and lung", "Z66": "Do not resuscitate",
    "Z51": "Encounter for other aftercare and medical care",
}
_QUALIFIERS = (
    ("unspecified", "acute", "chronic", "acute on chronic", "with complications",
     "without complications", "other specified", "recurrent", "mild", "severe"),
    ("initial encounter", "subsequent encounter", "left side", "right side", "bilateral",
     "with hemorrhage", "without hemorrhage", "in remission", "not in remission",
     "due to other specified cause"),
    ("with coma", "without coma", "with obstruction", "without obstruction", "with perforation",
     "without perforation", "stage 1", "stage 2", "stage 3", "stage 4"),
)


def _icd9_category(code: str) -> str:
    return code[:4] if code.startswith("E") else code[:3]


class CodeSystem(NamedTuple):
    """Diagnosis concepts: rows 0..n_generic-1 are Zipf-drawn, the rest are risk/shared codes."""

    icd9: np.ndarray       # object array of code strings, one per concept
    icd10: np.ndarray
    zipf_p: np.ndarray     # probabilities over the generic concepts (rank-ordered by weight)
    n_generic: int
    risk_offset: dict[str, int]  # group -> first concept index of its risk codes
    shared_offset: int
    dictionary: pl.DataFrame  # d_icd_diagnoses rows


def _leaf_suffixes(rng: np.random.Generator, k: int, depth: int, allow_self: bool) -> list[tuple[int, ...]]:
    """k distinct digit paths forming a valid code hierarchy (no path is a prefix of another)."""
    if k == 1 and (depth == 0 or (allow_self and rng.random() < 0.8)):
        return [()]
    k = min(k, 10 ** depth)
    # wide first: most real sub-codes are one or two characters below the category
    n_children = min(k, 10) if rng.random() < 0.6 else int(rng.integers(1, min(k, 10) + 1))
    digits = np.sort(rng.choice(10, n_children, replace=False))
    sizes = 1 + rng.multinomial(k - n_children, np.full(n_children, 1 / n_children))
    out: list[tuple[int, ...]] = []
    for digit, size in zip(digits, sizes):
        size = min(int(size), 10 ** (depth - 1)) if depth > 1 else 1
        out += [(int(digit), *rest) for rest in _leaf_suffixes(rng, size, depth - 1, True)]
    return out


@lru_cache(maxsize=4)
def code_system(params: SimulationParams = SimulationParams()) -> CodeSystem:
    """The fixed diagnosis code system (depends on ``params.vocab_seed`` and the Zipf law only)."""
    rng = np.random.default_rng(params.vocab_seed)
    risk_cats9 = {_icd9_category(c.icd9) for cs in (*RISK_CODES.values(), SHARED_CODES) for c in cs}
    risk_cats10 = {c.icd10[:3] for cs in (*RISK_CODES.values(), SHARED_CODES) for c in cs}
    cats9 = [c[0] for c in ICD_CATEGORIES]
    cats10 = [c[1] for c in ICD_CATEGORIES]
    assert len(set(cats9)) == len(cats9) and len(set(cats10)) == len(cats10)
    assert not (risk_cats9 & set(cats9)) and not (risk_cats10 & set(cats10))

    icd9, icd10, title9, title10, order_key = [], [], [], [], []
    for pos, (c9, c10, title) in enumerate(ICD_CATEGORIES):
        k = int(min(rng.geometric(1 / 12), 40))
        depth9 = 1 if c9.startswith("E") else 2
        leaves9 = _leaf_suffixes(rng, k, depth9, allow_self=True)
        leaves10 = _leaf_suffixes(rng, len(leaves9), 3, allow_self=True)
        k = min(len(leaves9), len(leaves10))
        for s9, s10 in zip(leaves9[:k], leaves10[:k]):
            icd9.append(c9 + "".join(map(str, s9)))
            icd10.append(c10 + "".join(map(str, s10)))
            title9.append(", ".join([title, *(_QUALIFIERS[i][d] for i, d in enumerate(s9))]))
            title10.append(", ".join([title, *(_QUALIFIERS[i][d] for i, d in enumerate(s10))]))
            order_key.append(pos + rng.exponential(25.0))
    # Zipf-Mandelbrot weights by rank; common categories tend to get the low ranks.
    rank = np.empty(len(icd9), dtype=np.int64)
    rank[np.argsort(order_key, kind="stable")] = np.arange(1, len(icd9) + 1)
    weight = 1.0 / (rank + params.zipf_q) ** params.zipf_s
    n_generic = len(icd9)

    risk_offset = {}
    for group in RACE_GROUPS:
        risk_offset[group] = len(icd9)
        for c in RISK_CODES[group]:
            icd9.append(c.icd9), icd10.append(c.icd10), title9.append(c.title9), title10.append(c.title10)
    shared_offset = len(icd9)
    for c in SHARED_CODES:
        icd9.append(c.icd9), icd10.append(c.icd10), title9.append(c.title9), title10.append(c.title10)

    cat_title10 = {c10: t for _, c10, t in ICD_CATEGORIES} | _RISK_CATEGORY_TITLES
    leaf10 = set(icd10)
    cat_rows = sorted(c for c in {code[:3] for code in icd10} if c not in leaf10)
    dictionary = pl.DataFrame({
        "icd_code": [*icd9, *icd10, *cat_rows],
        "icd_version": [9] * len(icd9) + [10] * (len(icd10) + len(cat_rows)),
        "long_title": [*title9, *title10, *(cat_title10[c] for c in cat_rows)],
    }, schema={"icd_code": pl.String, "icd_version": pl.Int64, "long_title": pl.String})
    dictionary = dictionary.unique(["icd_code", "icd_version"], keep="first", maintain_order=True)
    return CodeSystem(np.array(icd9, dtype=object), np.array(icd10, dtype=object), weight / weight.sum(),
                      n_generic, risk_offset, shared_offset, dictionary)


# ---------------------------------------------------------------------------------------------
# Lab items and panels
# ---------------------------------------------------------------------------------------------

class LabItem(NamedTuple):
    """One lab item: identity (as in MIMIC d_labitems), units, reference range and value law."""

    itemid: int
    label: str
    fluid: str
    category: str
    uom: str | None
    ref_lower: str | None
    ref_upper: str | None
    decimals: int
    log_scale: bool         # value = exp(log(center) + spread * z) else center + spread * z
    center: float
    spread: float
    vmin: float
    vmax: float
    text: tuple[tuple[str, float], ...] = ()  # text results and weights
    p_text: float = 0.0     # probability a result is text (1.0: a text-only item)
    p_text_in_comments: float = 0.85  # text result written to comments (value empty)


_B, _U = "Blood", "Urine"
_CHEM, _HEM, _BG = "Chemistry", "Hematology", "Blood Gas"
_SMEAR = (("NORMAL", 0.55), ("1+", 0.25), ("2+", 0.1), ("OCCASIONAL", 0.1))
_GRADE = (("NEG", 0.55), ("TR", 0.15), ("SM", 0.13), ("MOD", 0.1), ("LG", 0.07))
LAB_ITEMS: tuple[LabItem, ...] = (
    # chemistry
    LabItem(50983, "Sodium", _B, _CHEM, "mEq/L", "133", "145", 0, False, 138, 4.7, 100, 180),
    LabItem(50971, "Potassium", _B, _CHEM, "mEq/L", "3.3", "5.1", 1, False, 4.1, 0.58, 1.5, 9.5),
    LabItem(50902, "Chloride", _B, _CHEM, "mEq/L", "96", "108", 0, False, 101, 6.2, 65, 140),
    LabItem(50882, "Bicarbonate", _B, _CHEM, "mEq/L", "22", "32", 0, False, 25, 4.3, 5, 50),
    LabItem(51006, "Urea Nitrogen", _B, _CHEM, "mg/dL", "6", "20", 0, True, 19, 0.74, 1, 250),
    LabItem(50912, "Creatinine", _B, _CHEM, "mg/dL", "0.5", "1.2", 1, True, 1.0, 0.64, 0.1, 25),
    LabItem(50931, "Glucose", _B, _CHEM, "mg/dL", "70", "100", 0, True, 121, 0.38, 20, 1500),
    LabItem(50868, "Anion Gap", _B, _CHEM, "mEq/L", "8", "20", 0, False, 14, 3.9, 1, 50),
    LabItem(50960, "Magnesium", _B, _CHEM, "mg/dL", "1.6", "2.6", 1, False, 2.0, 0.27, 0.5, 6),
    LabItem(50893, "Calcium, Total", _B, _CHEM, "mg/dL", "8.4", "10.3", 1, False, 8.5, 0.78, 4, 16),
    LabItem(50970, "Phosphate", _B, _CHEM, "mg/dL", "2.7", "4.5", 1, True, 3.5, 0.34, 0.5, 15),
    LabItem(50934, "H", _B, _CHEM, "U", "0", "40", 0, True, 7, 1.2, 0, 900),
    LabItem(50947, "I", _B, _CHEM, "U", "0", "10", 0, False, 1, 0.8, 0, 30),
    LabItem(51678, "L", _B, _CHEM, "U", "0", "60", 0, True, 10, 0.69, 0, 900),
    # blood count
    LabItem(51301, "White Blood Cells", _B, _HEM, "K/uL", "4", "10", 1, True, 9.3, 0.64, 0.1, 300),
    LabItem(51279, "Red Blood Cells", _B, _HEM, "m/uL", "4.6", "6.1", 2, False, 3.33, 0.77, 1, 7),
    LabItem(51222, "Hemoglobin", _B, _HEM, "g/dL", "13.7", "17.5", 1, False, 9.8, 2.2, 3, 20),
    LabItem(51221, "Hematocrit", _B, _HEM, "%", "40", "51", 1, False, 29.9, 6.6, 10, 65),
    LabItem(51250, "MCV", _B, _HEM, "fL", "82", "98", 0, False, 91, 7, 55, 130),
    LabItem(51248, "MCH", _B, _HEM, "pg", "26", "32", 1, False, 30.1, 2.7, 15, 45),
    LabItem(51249, "MCHC", _B, _HEM, "g/dL", "32", "37", 1, False, 32.6, 1.6, 25, 40),
    LabItem(51277, "RDW", _B, _HEM, "%", "10.5", "15.5", 1, True, 15.4, 0.16, 10, 35),
    LabItem(51265, "Platelet Count", _B, _HEM, "K/uL", "150", "400", 0, True, 190, 0.6, 5, 1500),
    LabItem(52172, "RDW-SD", _B, _HEM, "fL", "35.1", "46.3", 1, True, 52.1, 0.18, 30, 130),
    # differential
    LabItem(51256, "Neutrophils", _B, _HEM, "%", "34", "71", 1, False, 64, 15, 0, 100),
    LabItem(51244, "Lymphocytes", _B, _HEM, "%", "19", "53", 1, True, 17.9, 0.7, 0, 100),
    LabItem(51254, "Monocytes", _B, _HEM, "%", "5", "13", 1, True, 6.9, 0.5, 0, 60),
    LabItem(51200, "Eosinophils", _B, _HEM, "%", "1", "7", 1, True, 1.2, 0.9, 0, 40),
    LabItem(51146, "Basophils", _B, _HEM, "%", "0", "1", 1, False, 0.4, 0.4, 0, 5),
    LabItem(51133, "Absolute Lymphocyte Count", _B, _HEM, "K/uL", "1.2", "3.7", 2, True, 1.81, 0.8, 0, 100),
    LabItem(52075, "Absolute Neutrophil Count", _B, _HEM, "K/uL", "1.6", "6.1", 2, True, 6.08, 0.7, 0, 100),
    LabItem(52074, "Absolute Monocyte Count", _B, _HEM, "K/uL", "0.2", "0.8", 2, True, 0.81, 0.7, 0, 30),
    LabItem(52073, "Absolute Eosinophil Count", _B, _HEM, "K/uL", "0.04", "0.54", 2, True, 0.12, 1.0, 0, 10),
    LabItem(52069, "Absolute Basophil Count", _B, _HEM, "K/uL", "0.01", "0.08", 2, True, 0.03, 0.9, 0, 3),
    # coagulation
    LabItem(51274, "PT", _B, _HEM, "sec", "9.4", "12.5", 1, True, 14.0, 0.29, 8, 150),
    LabItem(51237, "INR(PT)", _B, _HEM, None, "0.9", "1.1", 1, True, 1.3, 0.31, 0.7, 15,
            (("ERROR", 0.5), ("UNABLE TO REPORT", 0.5)), 0.01, 0.0),
    LabItem(51275, "PTT", _B, _HEM, "sec", "25", "36.5", 1, True, 33.4, 0.39, 18, 150),
    # liver
    LabItem(50861, "Alanine Aminotransferase (ALT)", _B, _CHEM, "IU/L", "0", "40", 0, True, 28, 0.99, 2, 8000),
    LabItem(50878, "Asparate Aminotransferase (AST)", _B, _CHEM, "IU/L", "0", "40", 0, True, 37, 0.79, 5, 9000),
    LabItem(50863, "Alkaline Phosphatase", _B, _CHEM, "IU/L", "40", "130", 0, True, 91, 0.52, 10, 3000),
    LabItem(50885, "Bilirubin, Total", _B, _CHEM, "mg/dL", "0", "1.5", 1, True, 0.5, 1.0, 0.1, 50),
    LabItem(50862, "Albumin", _B, _CHEM, "g/dL", "3.5", "5.2", 1, False, 3.6, 0.74, 1, 6),
    LabItem(50954, "Lactate Dehydrogenase (LD)", _B, _CHEM, "IU/L", "94", "250", 0, True, 281, 0.7, 50, 10000),
    # blood gas
    LabItem(52033, "Specimen Type", _B, _BG, None, None, None, 0, False, 0, 0, 0, 0,
            (("ART.", 0.6), ("VEN.", 0.25), ("MIX.", 0.05), ("CENTRAL VENOUS.", 0.1)), 1.0, 0.0),
    LabItem(50820, "pH", _B, _BG, "units", "7.35", "7.45", 2, False, 7.38, 0.09, 6.7, 7.8),
    LabItem(50818, "pCO2", _B, _BG, "mm Hg", "35", "45", 0, False, 40, 9.4, 10, 150),
    LabItem(50821, "pO2", _B, _BG, "mm Hg", "85", "105", 0, True, 99, 0.74, 15, 600),
    LabItem(50802, "Base Excess", _B, _BG, "mEq/L", None, None, 0, False, -1, 5.9, -30, 30),
    LabItem(50804, "Calculated Total CO2", _B, _BG, "mEq/L", "21", "30", 0, False, 25, 5.9, 5, 50),
    LabItem(50813, "Lactate", _B, _BG, "mmol/L", "0.5", "2", 1, True, 1.8, 0.56, 0.3, 30),
    LabItem(50808, "Free Calcium", _B, _BG, "mmol/L", "1.12", "1.32", 2, False, 1.12, 0.08, 0.6, 1.8),
    # urinalysis
    LabItem(51491, "pH", _U, _HEM, "units", "5", "8", 1, False, 6.0, 0.6, 5, 9),
    LabItem(51498, "Specific Gravity", _U, _HEM, " ", "1.001", "1.035", 3, False, 1.017, 0.008, 1.001, 1.05,
            ((">=1.035", 1.0),), 0.027, 0.0),
    LabItem(51514, "Urobilinogen", _U, _HEM, "mg/dL", "0.2", "1", 0, True, 2, 0.6, 1, 12,
            (("NEG", 1.0),), 0.8),
    LabItem(51478, "Glucose", _U, _HEM, "mg/dL", "0", "0", 0, True, 300, 0.9, 10, 1000, (("NEG", 1.0),), 0.8),
    LabItem(51492, "Protein", _U, _HEM, "mg/dL", "0", "0", 0, True, 30, 0.9, 10, 600, (("NEG", 1.0),), 0.5),
    LabItem(51484, "Ketone", _U, _HEM, "mg/dL", "0", "0", 0, True, 15, 0.8, 5, 150, (("NEG", 1.0),), 0.85),
    LabItem(51464, "Bilirubin", _U, _HEM, "mg/dL", None, None, 0, False, 0, 0, 0, 0,
            (("NEG", 0.9), ("SM", 0.06), ("MOD", 0.03), ("LG", 0.01)), 1.0),
    LabItem(51508, "Urine Color", _U, _HEM, None, None, None, 0, False, 0, 0, 0, 0,
            (("Yellow", 0.6), ("Straw", 0.25), ("Amber", 0.1), ("Red", 0.03), ("Brown", 0.02)), 1.0),
    LabItem(51506, "Urine Appearance", _U, _HEM, None, None, None, 0, False, 0, 0, 0, 0,
            (("Clear", 0.6), ("Hazy", 0.25), ("Cloudy", 0.15)), 1.0),
    LabItem(51466, "Blood", _U, _HEM, None, None, None, 0, False, 0, 0, 0, 0, _GRADE, 1.0),
    LabItem(51487, "Nitrite", _U, _HEM, None, None, None, 0, False, 0, 0, 0, 0, (("NEG", 0.9), ("POS", 0.1)), 1.0),
    LabItem(51486, "Leukocytes", _U, _HEM, None, None, None, 0, False, 0, 0, 0, 0, _GRADE, 1.0),
    # blood smear
    LabItem(51266, "Platelet Smear", _B, _HEM, "N/A", None, None, 0, False, 0, 0, 0, 0,
            (("NORMAL", 0.6), ("LOW", 0.2), ("VERY LOW", 0.12), ("HIGH", 0.08)), 1.0),
    LabItem(51267, "Poikilocytosis", _B, _HEM, "N/A", None, None, 0, False, 0, 0, 0, 0, _SMEAR, 1.0),
    LabItem(51137, "Anisocytosis", _B, _HEM, "N/A", None, None, 0, False, 0, 0, 0, 0, _SMEAR, 1.0),
    LabItem(51268, "Polychromasia", _B, _HEM, "N/A", None, None, 0, False, 0, 0, 0, 0, _SMEAR, 1.0),
)
# Panels: items drawn together on one specimen, each with its inclusion probability.
PANELS: dict[str, tuple[tuple[int, float], ...]] = {
    "chem": ((50983, 1), (50971, 1), (50902, 1), (50882, 1), (51006, 1), (50912, 1), (50931, 1),
             (50868, 1), (50960, 0.8), (50893, 0.8), (50970, 0.75), (50934, 0.45), (50947, 0.45),
             (51678, 0.45)),
    "cbc": ((51301, 1), (51279, 1), (51222, 1), (51221, 1), (51250, 1), (51248, 1), (51249, 1),
            (51277, 1), (51265, 1), (52172, 0.55)),
    "diff": ((51256, 1), (51244, 1), (51254, 1), (51200, 1), (51146, 1), (51133, 0.6), (52075, 0.6),
             (52074, 0.6), (52073, 0.6), (52069, 0.6)),
    "coag": ((51274, 1), (51237, 1), (51275, 1)),
    "lft": ((50861, 1), (50878, 1), (50863, 1), (50885, 1), (50862, 0.5), (50954, 0.5)),
    "bg": ((52033, 1), (50820, 1), (50818, 1), (50821, 1), (50802, 1), (50804, 1), (50813, 0.85),
           (50808, 0.55)),
    "ua": ((51491, 1), (51498, 1), (51514, 1), (51478, 1), (51492, 1), (51484, 1), (51464, 1),
           (51508, 1), (51506, 1), (51466, 1), (51487, 1), (51486, 1)),
    "smear": ((51266, 0.9), (51267, 0.9), (51137, 0.9), (51268, 0.9)),
}
_ERROR_NOTES = ("HOLD.  DISCARD GREATER THAN 4 HOURS OLD.", "HOLD.  SPECIMEN TO BE HELD 48 HOURS AND DISCARDED.",
                "ERROR", "UNABLE TO REPORT")
_DEID = "___"
_GLUCOSE_COMMENT = "IF FASTING, 70-100 NORMAL, >125 PROVISIONAL DIABETES."


def lab_items_frame() -> pl.DataFrame:
    """The ``d_labitems`` rows of the simulated items."""
    return pl.DataFrame([(i.itemid, i.label, i.fluid, i.category) for i in LAB_ITEMS],
                        schema={c: t for c, t in zip(TABLE_COLUMNS["d_labitems"],
                                                     (pl.Int64, pl.String, pl.String, pl.String))},
                        orient="row")


class _LabTables(NamedTuple):
    """Lab item attributes as arrays indexed by item position, and the panel layouts."""

    itemid: np.ndarray
    decimals: np.ndarray
    log_scale: np.ndarray
    center: np.ndarray
    spread: np.ndarray
    vmin: np.ndarray
    vmax: np.ndarray
    lower: np.ndarray      # numeric reference range (nan when none)
    upper: np.ndarray
    p_text: np.ndarray
    p_text_in_comments: np.ndarray
    text_cdf: list[np.ndarray]  # per item, cumulative weights over its text results
    text_index: list[np.ndarray]  # per item, index of each text result in ``strings``
    strings: tuple[str, ...]    # every literal written to value / comments
    as_comment: np.ndarray      # string index -> index of the same result as a comment ("NEG" -> "NEG.")
    panels: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (item positions, inclusion probs)
    shift: np.ndarray           # (n_groups, n_items) shift of the admission ending in death


@lru_cache(maxsize=4)
def _lab_tables(params: SimulationParams) -> _LabTables:
    pos = {item.itemid: i for i, item in enumerate(LAB_ITEMS)}
    strings: list[str] = [_DEID, _GLUCOSE_COMMENT, *_ERROR_NOTES]
    results = list(dict.fromkeys(t for item in LAB_ITEMS for t, _ in item.text))
    # a text result is written plain in value, or with a trailing period in comments (as MIMIC does)
    strings += [s for s in dict.fromkeys([*results, *(t.rstrip(".") + "." for t in results)]) if s not in strings]
    as_comment = np.array([strings.index(t.rstrip(".") + ".") if t in results else i
                           for i, t in enumerate(strings)], dtype=np.int64)
    text_cdf, text_index = [], []
    for item in LAB_ITEMS:
        w = np.array([w for _, w in item.text], dtype=float)
        text_cdf.append(np.cumsum(w) / w.sum() if len(w) else np.zeros(0))
        text_index.append(np.array([strings.index(t) for t, _ in item.text], dtype=np.int64))

    def ref(v: str | None) -> float:
        return float(v) if v is not None else np.nan

    shift = np.zeros((len(RACE_GROUPS), len(LAB_ITEMS)))
    for g, shifts in enumerate(params.lab_shifts):
        for itemid, s in (*shifts, *params.lab_shift_shared):
            shift[g, pos[itemid]] += s
    panels = {name: (np.array([pos[i] for i, _ in items]), np.array([p for _, p in items], dtype=float))
              for name, items in PANELS.items()}
    arr = lambda f, dt=float: np.array([getattr(i, f) for i in LAB_ITEMS], dtype=dt)  # noqa: E731
    return _LabTables(
        arr("itemid", np.int64), arr("decimals", np.int64), arr("log_scale", bool), arr("center"),
        arr("spread"), arr("vmin"), arr("vmax"),
        np.array([ref(i.ref_lower) for i in LAB_ITEMS]), np.array([ref(i.ref_upper) for i in LAB_ITEMS]),
        arr("p_text"), arr("p_text_in_comments"), text_cdf, text_index, tuple(strings), as_comment, panels,
        shift)


# ---------------------------------------------------------------------------------------------
# Admission-level categorical tables (shaped like the demo's)
# ---------------------------------------------------------------------------------------------

ADMISSION_TYPES = (("EW EMER.", 0.38), ("OBSERVATION ADMIT", 0.16), ("URGENT", 0.14),
                   ("EU OBSERVATION", 0.11), ("SURGICAL SAME DAY ADMISSION", 0.065),
                   ("DIRECT EMER.", 0.055), ("ELECTIVE", 0.047), ("DIRECT OBSERVATION", 0.025),
                   ("AMBULATORY OBSERVATION", 0.018))
_ED_PROB = {"EW EMER.": 0.92, "EU OBSERVATION": 0.9, "OBSERVATION ADMIT": 0.6, "URGENT": 0.2,
            "DIRECT EMER.": 0.1}
ADMISSION_LOCATIONS = (("EMERGENCY ROOM", 0.49), ("PHYSICIAN REFERRAL", 0.23), ("TRANSFER FROM HOSPITAL", 0.156),
                       ("CLINIC REFERRAL", 0.036), ("PROCEDURE SITE", 0.025), ("WALK-IN/SELF REFERRAL", 0.025),
                       ("TRANSFER FROM SKILLED NURSING FACILITY", 0.015), ("PACU", 0.015),
                       ("INTERNAL TRANSFER TO OR FROM PSYCH", 0.007), ("INFORMATION NOT AVAILABLE", 0.004))
DISCHARGE_LOCATIONS = (("HOME HEALTH CARE", 0.29), ("HOME", 0.28), (None, 0.16), ("SKILLED NURSING FACILITY", 0.14),
                       ("REHAB", 0.05), ("CHRONIC/LONG TERM ACUTE CARE", 0.035), ("HOSPICE", 0.02),
                       ("AGAINST ADVICE", 0.015), ("PSYCH FACILITY", 0.008), ("ACUTE HOSPITAL", 0.004))
LANGUAGES = (("ENGLISH", 0.92), ("?", 0.08))
# marital status by age band (<30, 30-64, 65+)
MARITAL = ("SINGLE", "MARRIED", "DIVORCED", "WIDOWED", None)
_MARITAL_PROBS = ((0.80, 0.12, 0.02, 0.00, 0.06), (0.35, 0.45, 0.12, 0.03, 0.05), (0.15, 0.42, 0.10, 0.28, 0.05))
ANCHOR_YEAR_GROUPS = ("2008 - 2010", "2011 - 2013", "2014 - 2016", "2017 - 2019")
_PROVIDERS = 2000


@lru_cache(maxsize=4)
def _providers(vocab_seed: int) -> tuple[str, ...]:
    rng = np.random.default_rng(vocab_seed + 1)
    alphabet = np.array(list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    ids = sorted({"P" + "".join(rng.choice(alphabet, 5)) for _ in range(_PROVIDERS)})
    return tuple(ids)


# ---------------------------------------------------------------------------------------------
# Generation of one block of patients
# ---------------------------------------------------------------------------------------------

_MIN_PER_DAY = 1440
_MIN_PER_YEAR = 525_960  # 365.25 days
_US_PER_MIN = 60_000_000


def _scramble(x: np.ndarray, modulus: int, salt: int) -> np.ndarray:
    """A bijection of [0, modulus) that makes consecutive ids look random (ids stay unique).

    Odd multipliers and xor-shifts are bijections of [0, 2^bits); cycle-walking restricts that
    permutation to [0, modulus).
    """
    bits = max(8, int(modulus - 1).bit_length())
    mask, half = (1 << bits) - 1, bits // 2
    x = np.asarray(x, dtype=np.uint64).copy()
    todo = np.ones(len(x), dtype=bool)
    while todo.any():
        y = (x[todo] + np.uint64(0x5BD1E995 * salt)) & np.uint64(mask)  # so that 0 does not map to 0
        for mult in (0x9E3779B1 + 2 * salt, 0x85EBCA77):
            y = (y * np.uint64(mult | 1)) & np.uint64(mask)
            y ^= y >> np.uint64(half)
        x[todo] = y
        todo[todo] = y >= modulus
    return x.astype(np.int64)


def _pick(rng: np.random.Generator, probs: Sequence[float], n: int) -> np.ndarray:
    p = np.asarray(probs, dtype=float)
    return np.searchsorted(np.cumsum(p) / p.sum(), rng.random(n), side="right").clip(0, len(p) - 1)


def _pick_rows(rng: np.random.Generator, table: np.ndarray, row: np.ndarray) -> np.ndarray:
    """One categorical draw per element, from ``table[row[i]]`` (a matrix of probabilities)."""
    cdf = np.cumsum(table, axis=1)
    cdf /= cdf[:, -1:]
    u = rng.random(len(row))
    return (u[:, None] >= cdf[row]).sum(axis=1).clip(0, table.shape[1] - 1)


def _strings(values: Sequence[str | None], index: np.ndarray) -> pl.Series:
    """``values[index]`` as a polars Enum column (null where the value is None); cheap to gather
    and written to CSV as the plain strings."""
    enum = pl.Enum(list(dict.fromkeys(v for v in values if v is not None)))
    return pl.Series(list(values), dtype=enum).gather(pl.Series(index, dtype=pl.UInt32))


def _ints(values: np.ndarray, valid: np.ndarray | None = None) -> pl.Series:
    """An Int64 column, null where ``valid`` is false."""
    mask = None if valid is None else ~np.asarray(valid, dtype=bool)
    return pl.Series(pa.array(np.asarray(values, dtype=np.int64), type=pa.int64(), mask=mask))


def _datetimes(minutes: np.ndarray, valid: np.ndarray | None = None) -> pl.Series:
    """Minutes since 1970 as a Datetime column (minute resolution), null where ``valid`` is false."""
    return _ints(minutes * _US_PER_MIN, valid).cast(pl.Datetime("us"))


class _Block(NamedTuple):
    patients: pl.DataFrame
    admissions: pl.DataFrame
    diagnoses_icd: pl.DataFrame
    labevents: pl.DataFrame   # labevent_id and specimen_id still local (0-based)
    n_specimens: int
    counts: dict[str, int]


def _simulate_block(ss: np.random.SeedSequence, first: int, n: int, n_total: int,
                    params: SimulationParams) -> _Block:
    rng = np.random.default_rng(ss)
    cs, lab = code_system(params), _lab_tables(params)

    # -- patients ------------------------------------------------------------------------------
    stride = max(1, 9_999_999 // n_total)
    subject = 10_000_000 + (first + np.arange(n, dtype=np.int64)) * stride + rng.integers(0, stride, n)
    race = _pick(rng, params.race_probs, n)
    race_str_table = [s for g in RACE_GROUPS for s, _ in RACE_STRINGS[g]]
    race_str = np.empty(n, dtype=np.int64)
    offset = 0
    for g, group in enumerate(RACE_GROUPS):
        options = RACE_STRINGS[group]
        mask = race == g
        race_str[mask] = offset + _pick(rng, [w for _, w in options], int(mask.sum()))
        offset += len(options)
    female = rng.random(n) < params.p_female
    young = rng.random(n) < params.age_young_frac
    age = np.where(young, rng.normal(params.age_young_mean, params.age_young_sd, n),
                   rng.normal(params.age_old_mean, params.age_old_sd, n))
    age = np.rint(age).clip(18, 95).astype(np.int64)
    age[age >= 90] = 91
    insurance = _pick_rows(rng, params.insurance_probabilities(race, age), np.arange(n))
    died = rng.random(n) < params.death_probability(race, age, ~female, insurance)
    q, kmax = params.admissions_geometric_q, params.max_admissions
    n_adm = 1 + np.floor(np.log1p(-rng.random(n) * (1 - q ** kmax)) / np.log(q)).astype(np.int64)
    n_adm = n_adm.clip(1, kmax)
    anchor_year = rng.integers(2110, 2190, n)
    year_group = rng.integers(0, len(ANCHOR_YEAR_GROUPS), n)
    real_anchor = 2008 + 3 * year_group + 3 * rng.random(n)
    language = _pick(rng, [w for _, w in LANGUAGES], n)
    marital = _pick_rows(rng, np.array(_MARITAL_PROBS), np.digitize(age, [30, 65]))
    jan1 = (anchor_year - 1970).astype("datetime64[Y]").astype("datetime64[m]").astype(np.int64)

    # -- admissions ----------------------------------------------------------------------------
    n_a = int(n_adm.sum())
    pat = np.repeat(np.arange(n), n_adm)
    pat_start = np.cumsum(n_adm) - n_adm
    k = np.arange(n_a) - pat_start[pat]
    final = k == n_adm[pat] - 1
    death_adm = final & died[pat]
    los = rng.lognormal(math.log(params.los_median_days * _MIN_PER_DAY), params.los_sigma, n_a)
    los = np.maximum(np.rint(los * np.where(death_adm, params.death_los_factor, 1.0)), 120).astype(np.int64)
    gap = np.rint((1 + rng.exponential(params.gap_mean_days, n_a)) * _MIN_PER_DAY).astype(np.int64)
    first_offset = rng.integers(0, 2 * 365 * _MIN_PER_DAY, n)
    step = np.cumsum(los + gap) - (los + gap)           # time from the patient's first admission
    admit = jan1[pat] + first_offset[pat] + step - step[pat_start[pat]]
    disch = admit + los
    key = (first + pat).astype(np.int64) * 10 + k
    modulus = 10 ** max(7, math.ceil(math.log10(10 * n_total)))
    hadm = 20_000_000 + _scramble(key, modulus, salt=1)
    real_time = real_anchor[pat] + (admit - jan1[pat]) / _MIN_PER_YEAR
    icd10 = real_time >= params.icd10_from_year
    adm_type = _pick(rng, [w for _, w in ADMISSION_TYPES], n_a)
    ed_p = np.array([_ED_PROB.get(t, 0.0) for t, _ in ADMISSION_TYPES])[adm_type]
    has_ed = rng.random(n_a) < ed_p
    edreg = admit - rng.integers(60, 600, n_a)
    edout = admit + rng.integers(0, 180, n_a)
    adm_loc = _pick(rng, [w for _, w in ADMISSION_LOCATIONS], n_a)
    dis_loc = _pick(rng, [w for _, w in DISCHARGE_LOCATIONS], n_a)
    providers = _providers(params.vocab_seed)
    adm_provider = rng.integers(0, len(providers), n_a)
    dod_after = ~died & (rng.random(n) < params.p_dod_after_discharge)
    last_disch = disch[pat_start + n_adm - 1]
    dod_min = np.where(died, last_disch, last_disch + rng.integers(1, 366, n) * _MIN_PER_DAY)
    has_dod = died | dod_after

    patients = pl.DataFrame({
        "subject_id": subject,
        "gender": _strings(("F", "M"), (~female).astype(np.int64)),
        "anchor_age": age,
        "anchor_year": anchor_year.astype(np.int64),
        "anchor_year_group": _strings(ANCHOR_YEAR_GROUPS, year_group),
        "dod": _datetimes(dod_min, has_dod).dt.date(),
    })
    dis_names = [s for s, _ in DISCHARGE_LOCATIONS] + ["DIED"]
    admissions = pl.DataFrame({
        "subject_id": subject[pat],
        "hadm_id": hadm,
        "admittime": _datetimes(admit),
        "dischtime": _datetimes(disch),
        "deathtime": _datetimes(disch, death_adm),
        "admission_type": _strings([s for s, _ in ADMISSION_TYPES], adm_type),
        "admit_provider_id": _strings(providers, adm_provider),
        "admission_location": _strings([s for s, _ in ADMISSION_LOCATIONS], adm_loc),
        "discharge_location": _strings(dis_names, np.where(death_adm, len(dis_names) - 1, dis_loc)),
        "insurance": _strings(INSURANCES, insurance[pat]),
        "language": _strings([s for s, _ in LANGUAGES], language[pat]),
        "marital_status": _strings(MARITAL, marital[pat]),
        "race": _strings(race_str_table, race_str[pat]),
        "edregtime": _datetimes(edreg, has_ed),
        "edouttime": _datetimes(edout, has_ed),
        "hospital_expire_flag": death_adm.astype(np.int64),
    })

    # -- diagnoses -----------------------------------------------------------------------------
    n_dx = np.minimum(1 + rng.poisson(params.dx_mean_codes - 1, n_a), params.dx_max_codes)
    dx_adm = [np.repeat(np.arange(n_a), n_dx)]
    dx_concept = [rng.choice(cs.n_generic, int(n_dx.sum()), p=cs.zipf_p)]
    n_chronic = rng.poisson(params.chronic_mean, n)
    chronic = rng.choice(cs.n_generic, int(n_chronic.sum()), p=cs.zipf_p)
    chronic_pat = np.repeat(np.arange(n), n_chronic)
    reps = n_adm[chronic_pat]
    ch_adm = pat_start[np.repeat(chronic_pat, reps)] + (np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps))
    keep = rng.random(len(ch_adm)) < params.chronic_persistence
    dx_adm.append(ch_adm[keep])
    dx_concept.append(np.repeat(chronic, reps)[keep])
    # risk codes: per admission and risk/shared concept, present with a group- and outcome-dependent p
    risk_first = cs.risk_offset[RACE_GROUPS[0]]
    n_risk = len(cs.icd9) - risk_first
    concept_group = np.full(n_risk, -1)
    for g, group in enumerate(RACE_GROUPS):
        concept_group[cs.risk_offset[group] - risk_first:][:len(RISK_CODES[group])] = g
    p = np.full((n_a, n_risk), params.p_risk_code_background)
    own = death_adm[:, None] & (concept_group[None, :] == race[pat][:, None])
    p[own] = params.p_risk_code_death
    p[death_adm[:, None] & (concept_group[None, :] == -1)] = params.p_shared_code_death
    ra, rc = np.nonzero(rng.random((n_a, n_risk)) < p)
    dx_adm.append(ra)
    dx_concept.append(rc + risk_first)
    dx_adm_all, dx_concept_all = np.concatenate(dx_adm), np.concatenate(dx_concept)
    uniq = np.unique(dx_adm_all * len(cs.icd9) + dx_concept_all)
    d_adm, d_concept = uniq // len(cs.icd9), uniq % len(cs.icd9)
    order = np.lexsort((rng.random(len(uniq)), d_adm))
    d_adm, d_concept = d_adm[order], d_concept[order]
    seq = np.arange(len(d_adm)) - np.searchsorted(d_adm, d_adm, side="left") + 1
    d10 = icd10[d_adm]
    diagnoses = pl.DataFrame({
        "subject_id": subject[pat[d_adm]],
        "hadm_id": hadm[d_adm],
        "seq_num": seq.astype(np.int64),
        "icd_code": pl.Series(np.where(d10, cs.icd10[d_concept], cs.icd9[d_concept]).tolist(), dtype=pl.String),
        "icd_version": np.where(d10, 10, 9).astype(np.int64),
    })

    # -- lab draws (one specimen each) -----------------------------------------------------------
    los_days = los / _MIN_PER_DAY
    rate_factor = np.where(death_adm, params.death_lab_rate_factor, 1.0)
    draw_adm, draw_panel, draw_time, draw_inpatient = [], [], [], []
    panel_names = list(PANELS)
    for name, rate in params.inpatient_panel_rates:
        cnt = rng.poisson(rate * los_days * rate_factor)
        if name in ("chem", "cbc"):
            cnt = np.maximum(cnt, 1)
        a = np.repeat(np.arange(n_a), cnt)
        draw_adm.append(a)
        draw_panel.append(np.full(len(a), panel_names.index(name)))
        draw_time.append(admit[a] + (rng.random(len(a)) * los[a]).astype(np.int64))
        draw_inpatient.append(np.ones(len(a), dtype=bool))
    n_out = rng.poisson(params.outpatient_draws_per_admission, n_a)
    a = np.repeat(np.arange(n_a), n_out)
    mix_names = [m for m, _ in params.outpatient_panel_mix]
    draw_adm.append(a)
    draw_panel.append(np.array([panel_names.index(m) for m in mix_names])[
        _pick(rng, [w for _, w in params.outpatient_panel_mix], len(a))])
    inside = rng.random(len(a)) < params.p_outpatient_in_window
    before = np.rint((0.5 + rng.exponential(60.0, len(a))) * _MIN_PER_DAY).astype(np.int64)
    draw_time.append(np.where(inside, admit[a] + (rng.random(len(a)) * los[a]).astype(np.int64), admit[a] - before))
    draw_inpatient.append(np.zeros(len(a), dtype=bool))
    d_adm_l, d_panel = np.concatenate(draw_adm), np.concatenate(draw_panel)
    d_time, d_inp = np.concatenate(draw_time), np.concatenate(draw_inpatient)
    d_pat = pat[d_adm_l]
    order = np.lexsort((d_panel, d_time, d_pat))
    d_adm_l, d_panel, d_time, d_inp, d_pat = (x[order] for x in (d_adm_l, d_panel, d_time, d_inp, d_pat))
    n_d = len(d_adm_l)
    # which outpatient draws fall inside some admission window of the same patient (ground truth)
    big = np.int64(1) << 32
    pos = np.searchsorted(pat.astype(np.int64) * big + admit, d_pat.astype(np.int64) * big + d_time, "right") - 1
    in_window = (pos >= 0) & (pat[pos.clip(0)] == d_pat) & (d_time <= disch[pos.clip(0)])
    delay = np.rint(rng.lognormal(math.log(70), 0.6, n_d)).astype(np.int64)
    has_store = rng.random(n_d) >= 0.01
    priority = np.where(d_inp, _pick(rng, (0.6, 0.35, 0.05), n_d), _pick(rng, (0.1, 0.75, 0.15), n_d))
    priority[d_panel == panel_names.index("bg")] = 2
    has_order = rng.random(n_d) < 0.12
    order_provider = rng.integers(0, len(providers), n_d)

    # -- lab rows ---------------------------------------------------------------------------------
    row_draw, row_item = [], []
    for pi, name in enumerate(panel_names):
        draws = np.nonzero(d_panel == pi)[0]
        items, incl = lab.panels[name]
        rd, ri = np.repeat(draws, len(items)), np.tile(items, len(draws))
        keep = rng.random(len(rd)) < np.tile(incl, len(draws))
        row_draw.append(rd[keep])
        row_item.append(ri[keep])
    rd, ri = np.concatenate(row_draw), np.concatenate(row_item)
    order = np.lexsort((ri, rd))
    rd, ri = rd[order], ri[order]
    n_r = len(rd)
    r_pat = d_pat[rd]
    r_death = death_adm[d_adm_l[rd]] & d_inp[rd]
    u = rng.standard_normal((n, len(LAB_ITEMS)))
    rho = params.lab_patient_rho
    z = rho * u[r_pat, ri] + math.sqrt(1 - rho * rho) * rng.standard_normal(n_r)
    z += np.where(r_death, lab.shift[race[r_pat], ri], 0.0)
    center, spread = lab.center[ri], lab.spread[ri]
    x = np.where(lab.log_scale[ri], np.exp(np.log(np.maximum(center, 1e-9)) + spread * z), center + spread * z)
    x = x.clip(lab.vmin[ri], lab.vmax[ri])
    scale = 10 ** lab.decimals[ri]
    m = np.rint(x * scale).astype(np.int64)
    # kind: 0 numeric, 1 text in value, 2 text in comments, 3 error note, 4 de-identified value
    is_text = rng.random(n_r) < lab.p_text[ri]
    in_comments = rng.random(n_r) < lab.p_text_in_comments[ri]
    kind = np.where(is_text, np.where(in_comments, 2, 1), 0)
    ev = rng.random(n_r)
    kind[(kind == 0) & (ev < params.p_lab_error)] = 3
    kind[(kind == 0) & (ev > 1 - params.p_lab_deidentified)] = 4
    text = np.full(n_r, -1, dtype=np.int64)
    uu = rng.random(n_r)
    for it in np.unique(ri[is_text]):
        sel = np.nonzero(is_text & (ri == it))[0]
        choice = np.searchsorted(lab.text_cdf[it], uu[sel], side="right").clip(0, len(lab.text_cdf[it]) - 1)
        text[sel] = lab.text_index[it][choice]
    err = kind == 3
    text[err] = 2 + rng.integers(0, len(_ERROR_NOTES), int(err.sum()))
    text[kind == 4] = 0
    comment = np.full(n_r, -1, dtype=np.int64)
    comment[kind == 2] = lab.as_comment[text[kind == 2]]
    comment[err | (lab.itemid[ri] == 52033)] = 0  # "___"
    glucose = (lab.itemid[ri] == 50931) & (kind == 0) & (uu < 0.03)
    comment[glucose] = 1
    numeric = (kind == 0) | (kind == 4)
    valuenum = m / scale
    flag = numeric & ((valuenum < lab.lower[ri]) | (valuenum > lab.upper[ri]))

    counts = {"deaths": int(died.sum()), "lab_rows_without_hadm": int((~d_inp[rd]).sum()),
              "lab_rows_without_hadm_in_window": int((~d_inp[rd] & in_window[rd]).sum()),
              "lab_rows_without_valuenum": int((~numeric).sum())}
    labevents = _lab_frame(lab, subject[r_pat], np.where(d_inp[rd], hadm[d_adm_l[rd]], -1), rd, ri,
                           providers, np.where(has_order[rd], order_provider[rd], -1),
                           d_time[rd], np.where(has_store[rd], d_time[rd] + delay[rd], -1), kind, m,
                           text, comment, flag, priority[rd])
    return _Block(patients, admissions, diagnoses, labevents, n_d, counts)


def cohort_blocks(patients: int, seed: int, params: SimulationParams) -> Iterator[_Block]:
    """The cohort as consecutive blocks of :data:`SEED_BLOCK` patients, in order, with their final
    (cohort-wide) ``labevent_id`` and ``specimen_id``. Block ``b`` draws from the ``b``-th child of
    ``SeedSequence(seed)``, so the content does not depend on how blocks are grouped for writing."""
    seeds = np.random.SeedSequence(seed).spawn(-(-patients // SEED_BLOCK))
    spec_modulus = 10 ** 8 if patients <= 2_000_000 else 10 ** 10
    lab_offset = spec_offset = 0
    for b, ss in enumerate(seeds):
        first = b * SEED_BLOCK
        block = _simulate_block(ss, first, min(SEED_BLOCK, patients - first), patients, params)
        lab = block.labevents.with_columns(
            labevent_id=pl.int_range(1, block.labevents.height + 1, dtype=pl.Int64) + lab_offset,
            specimen_id=pl.Series(_scramble(block.labevents["specimen_id"].to_numpy() + spec_offset,
                                            spec_modulus, salt=2)))
        lab_offset += block.labevents.height
        spec_offset += block.n_specimens
        yield block._replace(labevents=lab)


def _lab_frame(lab: _LabTables, subject: np.ndarray, hadm: np.ndarray, draw: np.ndarray, item: np.ndarray,
               providers: Sequence[str], provider: np.ndarray, chart: np.ndarray, store: np.ndarray,
               kind: np.ndarray, m: np.ndarray, text: np.ndarray, comment: np.ndarray, flag: np.ndarray,
               priority: np.ndarray) -> pl.DataFrame:
    """Assemble labevents rows in the MIMIC layout; numbers are formatted here, vectorised by polars."""
    uom = [i.uom for i in LAB_ITEMS]
    lower, upper = [i.ref_lower for i in LAB_ITEMS], [i.ref_upper for i in LAB_ITEMS]
    strings = pl.Series(lab.strings, dtype=pl.String)
    dec = lab.decimals[item]
    frame = pl.DataFrame({
        "m": m, "p": 10 ** dec, "dec": dec, "kind": kind.astype(np.int8),
        "text": _ints(text, text >= 0).cast(pl.UInt32), "comment": _ints(comment, comment >= 0).cast(pl.UInt32),
    })
    a = pl.col("m").abs()
    fixed = (pl.when(pl.col("m") < 0).then(pl.lit("-")).otherwise(pl.lit(""))
             + (a // pl.col("p")).cast(pl.String)
             + pl.when(pl.col("dec") > 0).then(
                 pl.lit(".") + (a % pl.col("p")).cast(pl.String).str.zfill(pl.col("dec"))).otherwise(pl.lit("")))
    text_str = strings.gather(frame["text"])
    values = frame.select(
        value=pl.when(pl.col("kind") == 0).then(fixed)
        .when(pl.col("kind").is_in([1, 3, 4])).then(pl.lit(text_str)),
        valuenum=pl.when(pl.col("kind").is_in([0, 4]))
        .then((pl.col("m") / pl.col("p")).cast(pl.String).str.strip_suffix(".0")),
    )
    return pl.DataFrame({
        "labevent_id": pl.Series(np.zeros(len(m), dtype=np.int64)),
        "subject_id": subject,
        "hadm_id": _ints(hadm, hadm >= 0),
        "specimen_id": draw.astype(np.int64),
        "itemid": lab.itemid[item],
        "order_provider_id": _strings([*providers, None], np.where(provider < 0, len(providers), provider)),
        "charttime": _datetimes(chart),
        "storetime": _datetimes(np.maximum(store, 0), store >= 0),
        "value": values["value"],
        "valuenum": values["valuenum"],
        "valueuom": _strings(uom, item),
        "ref_range_lower": _strings(lower, item),
        "ref_range_upper": _strings(upper, item),
        "flag": _strings(("abnormal", None), np.where(flag, 0, 1)),
        "priority": _strings(("STAT", "ROUTINE", None), priority),
        "comments": strings.gather(frame["comment"]),
    })


# ---------------------------------------------------------------------------------------------
# Writing: one gzip member per table, chunks deflated in parallel
# ---------------------------------------------------------------------------------------------

def _deflate_csv(frame: pl.DataFrame, header: bool, level: int) -> tuple[bytes, bytes]:
    """Serialise ``frame`` as CSV and deflate it as a raw, byte-aligned (sync-flushed) segment."""
    buf = io.BytesIO()
    frame.write_csv(buf, include_header=header, datetime_format=DATETIME_FORMAT, date_format="%Y-%m-%d")
    raw = buf.getvalue()
    z = zlib.compressobj(level, zlib.DEFLATED, -15, 9)
    return raw, z.compress(raw) + z.flush(zlib.Z_SYNC_FLUSH)


class _GzipWriter:
    """A single-member gzip file assembled from independently deflated, ordered segments.

    Each segment is a raw deflate stream ending in a sync flush, so their concatenation followed by
    a final empty block is one valid deflate stream; the gzip header has mtime 0 and no file name.
    """

    def __init__(self, path: Path) -> None:
        self.path, self.f = path, open(path, "wb")
        self.f.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")
        self.crc, self.size, self.rows, self.header_done = 0, 0, 0, False

    def append(self, raw: bytes, deflated: bytes, rows: int) -> None:
        self.crc = zlib.crc32(raw, self.crc)
        self.size += len(raw)
        self.rows += rows
        self.f.write(deflated)

    def close(self) -> int:
        z = zlib.compressobj(COMPRESSION_LEVEL, zlib.DEFLATED, -15)
        self.f.write(z.flush(zlib.Z_FINISH) + struct.pack("<II", self.crc, self.size & 0xFFFFFFFF))
        self.f.close()
        return self.path.stat().st_size


class _Pipeline:
    """Deflate (table, chunk) segments on a thread pool and write them in submission order."""

    def __init__(self, writers: dict[str, _GzipWriter], level: int, workers: int = 2, max_chunks: int = 2):
        self.writers, self.level, self.max_chunks = writers, level, max_chunks
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deflate")
        self.pending: deque[list[tuple[str, int, Future]]] = deque()

    def submit(self, frames: dict[str, pl.DataFrame]) -> None:
        jobs = []
        for table, frame in frames.items():
            w = self.writers[table]
            jobs.append((table, frame.height, self.pool.submit(_deflate_csv, frame, not w.header_done, self.level)))
            w.header_done = True
        self.pending.append(jobs)
        while len(self.pending) > self.max_chunks:
            self._drain_one()

    def _drain_one(self) -> None:
        for table, rows, fut in self.pending.popleft():
            self.writers[table].append(*fut.result(), rows)

    def finish(self) -> None:
        while self.pending:
            self._drain_one()
        self.pool.shutdown()

    def abort(self) -> None:
        self.pool.shutdown(cancel_futures=True)
        for w in self.writers.values():
            w.f.close()


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def _check_args(patients: int, chunk_patients: int) -> None:
    if isinstance(patients, bool) or not isinstance(patients, (int, np.integer)) or patients <= 0:
        raise HaloBalanceError(f"patients must be a positive integer (got {patients!r}); e.g. --patients 1000")
    if patients > 9_999_999:
        raise HaloBalanceError(f"patients must be at most 9,999,999 so that subject_id keeps MIMIC's 8 digits "
                               f"(got {patients})")
    if isinstance(chunk_patients, bool) or not isinstance(chunk_patients, (int, np.integer)) or chunk_patients <= 0:
        raise HaloBalanceError(f"chunk_patients must be a positive integer (got {chunk_patients!r})")


def simulate(out: str | Path, *, patients: int, seed: int = 0, chunk_patients: int = DEFAULT_CHUNK_PATIENTS,
             overwrite: bool = False, progress: bool = True, params: SimulationParams | None = None) -> dict:
    """Write a simulated cohort in the MIMIC-IV ``hosp`` layout to ``out`` and return its summary.

    Parameters
    ----------
    out : str or Path
        Output folder; ``out/hosp/*.csv.gz`` and ``out/simulation.json`` are written atomically.
    patients : int
        Number of patients (1 .. 9,999,999).
    seed : int
        Seed of every random choice; the same seed and ``patients`` give the same table contents.
    chunk_patients : int
        Patients generated and written per chunk (rounded up to a multiple of ``SEED_BLOCK``);
        bounds memory, never changes the content.
    overwrite : bool
        Replace an existing ``out`` (only once the new output is complete).
    progress : bool
        Show a tqdm progress bar on stderr.
    params : SimulationParams, optional
        The generative parameters; the documented defaults when omitted.

    Returns
    -------
    dict
        ``rows`` and ``bytes`` per table, ``patients``, ``admissions``, ``deaths``, lab-row counts,
        ``seconds``, the seed and the parameters (all but ``seconds`` also in ``simulation.json``).
    """
    _check_args(patients, chunk_patients)
    params = params or SimulationParams()
    check_output_dir(out, overwrite=overwrite)
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    n_blocks = -(-patients // SEED_BLOCK)
    blocks_per_chunk = max(1, -(-chunk_patients // SEED_BLOCK))
    totals = {"deaths": 0, "lab_rows_without_hadm": 0, "lab_rows_without_hadm_in_window": 0,
              "lab_rows_without_valuenum": 0}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        hosp = tmp / "hosp"
        hosp.mkdir()
        writers = {t: _GzipWriter(hosp / f"{t}.csv.gz") for t in STREAMED_TABLES}
        pipe = _Pipeline(writers, COMPRESSION_LEVEL)
        bar = tqdm(total=patients, unit="patient", disable=not progress, desc="simulate")
        try:
            parts: list[_Block] = []
            for i, block in enumerate(cohort_blocks(patients, seed, params)):
                parts.append(block)
                for key, v in block.counts.items():
                    totals[key] += v
                bar.update(block.patients.height)
                if len(parts) == blocks_per_chunk or i == n_blocks - 1:
                    pipe.submit({t: pl.concat([getattr(p, t) for p in parts]) for t in STREAMED_TABLES})
                    parts = []
            pipe.finish()
        except BaseException:
            pipe.abort()
            raise
        finally:
            bar.close()
        sizes = {t: w.close() for t, w in writers.items()}
        rows = {t: w.rows for t, w in writers.items()}
        for table, frame in (("d_labitems", lab_items_frame()), ("d_icd_diagnoses", code_system(params).dictionary)):
            w = _GzipWriter(hosp / f"{table}.csv.gz")
            w.append(*_deflate_csv(frame, True, COMPRESSION_LEVEL), frame.height)
            sizes[table], rows[table] = w.close(), frame.height
        summary = {
            "source": "data_prep.simulate", "simulator_version": SIMULATOR_VERSION, "seed": seed,
            "patients": patients, "admissions": rows["admissions"], **totals,
            "mortality": totals["deaths"] / patients, "rows": rows, "bytes": sizes,
            "bytes_total": sum(sizes.values()), "chunk_patients": blocks_per_chunk * SEED_BLOCK,
            "seed_block": SEED_BLOCK, "compression_level": COMPRESSION_LEVEL,
            "versions": {"numpy": np.__version__, "polars": pl.__version__, "zlib": zlib.ZLIB_RUNTIME_VERSION},
            "params": asdict(params),
        }
        write_json(tmp / "simulation.json", summary)  # no wall time in it: same seed, same bytes
    return {**summary, "seconds": round(time.perf_counter() - t0, 3)}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.simulate",
        description="Write a seeded simulated cohort in the raw MIMIC-IV hosp layout "
                    "(patients, admissions, diagnoses_icd, labevents, d_labitems, d_icd_diagnoses).")
    parser.add_argument("--patients", type=_positive_int, required=True, help="number of patients")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (DIR/hosp/*.csv.gz)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--chunk-patients", type=_positive_int, default=DEFAULT_CHUNK_PATIENTS,
                        help=f"patients per chunk; bounds memory (default {DEFAULT_CHUNK_PATIENTS})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    summary = simulate(args.out, patients=args.patients, seed=args.seed, chunk_patients=args.chunk_patients,
                       overwrite=args.overwrite, progress=not args.quiet)
    print(f"wrote {summary['patients']:,} patients, {summary['admissions']:,} admissions, "
          f"{summary['rows']['diagnoses_icd']:,} diagnoses, {summary['rows']['labevents']:,} lab rows "
          f"({summary['bytes_total'] / 1e6:,.1f} MB) to {args.out} in {summary['seconds']:.1f} s")
    return summary


if __name__ == "__main__":
    from halo_balance.cli import run

    run(main)
