# Stubs for the part of pycocotools that segfactory's typed core uses. PyPI's types-pycocotools requires
# NumPy 2, which bpy 4.2 cannot load; delete this folder when the stack moves to NumPy 2.
