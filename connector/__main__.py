"""`python -m connector` is the `crm-approvals` command (used where the script is not on PATH)."""

from connector.cli import main

main()
