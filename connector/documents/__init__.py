"""Documents of approval requests: approval sheets and generated documents, rendered from
admin templates (jinja2's bounded sandbox) to HTML and PDF (WeasyPrint), stored, and
attached to the CRM record, replacing the previous version."""
