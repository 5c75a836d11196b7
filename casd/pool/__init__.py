"""The backend pool: connecting to mailbox servers, members and their health."""
