"""Raw EHR tables (MIMIC-IV, eICU, or the built-in simulator) to the prepared dataset format."""
