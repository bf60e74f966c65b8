"""Hardware profiles: what each piece of MoE serving work costs on a machine class (docs/profiles.md)."""

from moeserve.hardware.fit import CurveFit, fit_curve
from moeserve.hardware.measure import measure_hardware
from moeserve.hardware.profile_io import available_hardware_profiles, load_hardware_profile, save_profile
from moeserve.hardware.schema import SCHEMA_VERSION, HardwareProfile

__all__ = [
    "SCHEMA_VERSION",
    "CurveFit",
    "HardwareProfile",
    "available_hardware_profiles",
    "fit_curve",
    "load_hardware_profile",
    "measure_hardware",
    "save_profile",
]

