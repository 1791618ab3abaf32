"""A region's state folder (``<state>/<region>/``): what lives there and the one secret that keys it."""
