fn main() {
    eprintln!("rdmig: command line not built yet");
    std::process::exit(2);
}
