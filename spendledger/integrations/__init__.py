"""Plugins for the gateways users already run (client side: they import nothing of the server)."""
