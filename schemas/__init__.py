"""Contracts shared by every side, and nothing else: settings, OpenAI's wire models, our records
and API resources, the domain's errors, the import formats, the checkpoint manifest and the
bundled data. No database driver and no model library is imported here."""
