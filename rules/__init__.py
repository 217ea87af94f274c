"""The rules service: positions and presence from the backend into alerts (`rules.service`)."""
