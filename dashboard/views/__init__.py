"""The dashboard's pages, one file each with a render(): st.navigation runs them as scripts from the page table in
dashboard/navigation.py. No module of dashboard/ imports them (tests/test_dashboard_imports.py checks it)."""
