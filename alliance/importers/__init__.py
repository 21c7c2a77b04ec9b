"""Importers: FHIR R4, REDCap and research CSV exports into canonical events for landing/."""

from alliance.importers.common import ImportResult, MappingError
from alliance.importers.fhir import import_fhir, import_fhir_to_landing
from alliance.importers.redcap import import_redcap, import_redcap_to_landing
from alliance.importers.wide_csv import import_wide_csv, import_wide_csv_to_landing

__all__ = [
    "ImportResult",
    "MappingError",
    "import_fhir",
    "import_fhir_to_landing",
    "import_redcap",
    "import_redcap_to_landing",
    "import_wide_csv",
    "import_wide_csv_to_landing",
]
