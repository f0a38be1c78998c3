"""Who people are: each connection's CRM users (name, e-mail, locale, manager, active),
read from the CRM and cached in the database. Mapping files keep ids; pages and messages
show names through this directory.

    directory = Directory.from_runtime(runtime)
    directory.display_name("sandbox", "u-mgr-boris")    # "Boris Novak" (the id when unknown)
    directory.get("sandbox", "u-mgr-boris")             # Person | None
    directory.find_by_email("boris.novak@sandbox.example")  # [Person, ...] active ones
    directory.manager_of("sandbox", "u-rep-anna")       # Person | None
    directory.refresh("sandbox")                        # read the CRM now

The worker refreshes every connection every DIRECTORY_REFRESH_MINUTES (a sweep job).
"""

from connector.directory.service import Directory, Person, RefreshResult

__all__ = ["Directory", "Person", "RefreshResult"]
