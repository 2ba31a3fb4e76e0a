"""Export formats. Each module registers one `lfq_export.formats_api.FormatAdapter`."""
