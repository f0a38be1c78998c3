"""The web app for people (mounted under /app): approvers' inbox, request pages with one-click
decisions, submitters' own requests, the admin view, sign-in. Server-rendered Jinja with htmx
for partial updates. See docs/web.md."""
