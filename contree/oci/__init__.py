"""Image import: OCI distribution client, reference parsing, safe layer extraction, local archives.

Entry points: `contree.oci.importer.import_image` (used by the engine's import operation),
`contree.oci.reference.parse_source`, `contree.oci.credentials` (used by the registry tools).
"""
