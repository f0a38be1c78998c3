"""The sandbox CRM: a small local CRM (deals, companies, users) so a newcomer can watch the
whole flow - edit a deal, a signed webhook reaches us, the outcome is written back - with
no account anywhere. See docs/crms/sandbox.md.

store.py keeps the data in its own SQLite file, seed.py fills it, app.py serves the page
and the REST API and sends the webhooks; connector/crm/sandbox.py is our adapter for it.
"""
