"""Pool policies: sizing and naming, checkout and release, logoff actions and power."""
