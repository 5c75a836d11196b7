"""The service assembly: the twistd composition root, listeners, workers, reload, protocol discovery."""
