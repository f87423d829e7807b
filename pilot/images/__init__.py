"""The node's side of images named by image lists: the content-addressed cache and where images are fetched from.

- :mod:`.cache`: the cache under the pilot's state directory (locks, resume, eviction, retirement);
- :mod:`.fetch`: the site mirror and the service's image endpoint, and :class:`.fetch.NodeImages`,
  what a slot's VM host uses.

Imported on the first VM start that names such an image, never at the pilot's start.
"""
