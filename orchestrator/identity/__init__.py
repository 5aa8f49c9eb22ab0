"""Desktop identity: generated values, the registry of identity operations, the seed."""
